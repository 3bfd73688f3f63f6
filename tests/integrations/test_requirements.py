"""A missing library gives an ImportError that names the extra to install."""
import pytest

from gradnorm_engine.integrations._requirements import INSTALL_HINT, require


def test_missing_library_names_the_extra():
    with pytest.raises(ImportError, match=r'pip install -e "\.\[integrations\]"') as info:
        require("no_such_al_library_xyz", distribution="no-such-al-library", adapter="baal")
    assert "gradnorm_engine.integrations.baal needs no-such-al-library" in str(info.value)
    assert INSTALL_HINT in str(info.value)   # the README's install command, from the checkout


def test_present_library_is_returned():
    assert require("json", distribution="json", adapter="modal").__name__ == "json"
