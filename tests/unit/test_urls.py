import pytest

from mitm_outpost.urls import host_keys, parse_origin_url, safe_redirect

ORIGIN = "https://app.example.com"

REJECTED = [
    "https://evil.com", "//evil.com", "///evil.com", "/\\evil.com", "\\\\evil.com", "/%5Cevil.com", "/%2F/evil.com",
    "/%09/evil.com", "/%0D/evil.com", "/%0A%5Cevil.com", "/./\\evil.com", "/./../../\\evil.com", "/%09%09/%09/evil.com",
    "http:evil.com", "https://app.example.com@evil.com/", "https://evil.com\\@app.example.com/",
    "https://evil.com#@app.example.com", "https://app.example.com.evil.com/", "https://evilapp.example.com/",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/plain,x", "//%0d%0aevil.com", "/x\r\nSet-Cookie: a=b",
    "http://app.example.com/", "https://app.example.com:444/", "https://APP.EXAMPLE.COM./x", "https://user:pw@app.example.com/",
    "", "/" + "a" * 9000,
]


@pytest.mark.parametrize("rd", REJECTED)
def test_foreign_or_ambiguous_targets_are_refused(rd: str) -> None:
    assert safe_redirect(rd, ORIGIN) is None


@pytest.mark.parametrize("rd, expected", [
    ("/a/b?c=d#e", "https://app.example.com/a/b?c=d#e"),
    ("https://app.example.com/x", "https://app.example.com/x"),
    ("https://APP.example.com:443/x/../y", "https://app.example.com/y"),
    ("relative", "https://app.example.com/relative"),
    ("https:evil.com", "https://app.example.com/evil.com"),  # same scheme: a browser reads a path on our host
])
def test_own_targets_are_normalised(rd: str, expected: str) -> None:
    assert safe_redirect(rd, ORIGIN) == expected


def test_origin_parsing() -> None:
    assert host_keys(parse_origin_url("http://h.test:8080")) == ("h.test:8080",)
    for bad in ("ftp://h.test", "http://h.test/path", "http://u@h.test", "h.test", "http://h.test?q"):
        with pytest.raises(ValueError):
            parse_origin_url(bad)
