"""The loopback check both servers make before binding: names and addresses that reach only this machine."""

import pytest

from lmforge.hosts import is_loopback


@pytest.mark.parametrize("host, local", [("localhost", True), ("127.0.0.1", True), ("127.5.0.9", True), ("::1", True),
                                         ("0.0.0.0", False), ("::", False), ("192.168.1.4", False),
                                         ("example.org", False), ("", False)])  # fmt: skip
def test_only_loopback_addresses_are_local(host, local):
    assert is_loopback(host) is local
