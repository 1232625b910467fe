import gzip
import json
from pathlib import Path

import pytest

pytest.importorskip("fastwarc")
pytest.importorskip("resiliparse")

from lmforge.data.base_reader import ErrorLog  # noqa: E402
from lmforge.data.readers import read_documents  # noqa: E402
from lmforge.data.web import decode_html  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WEB = DATA / "web"
CC_EXCERPT = WEB / "cc_warc" / "resiliparse_CC-MAIN-2020-34_excerpt.warc.gz"
BENCH = WEB / "html" / "article-extraction-benchmark"
WEWORK = "06e5123e4ef7cfb4533250dc45d1e03d0838fc66223f45c583c4d12f48b4da85"

needs_web_data = pytest.mark.skipif(not WEB.is_dir(), reason=f"web sample data not found at {WEB}")


def _read(source, **kwargs):
    errors = ErrorLog()
    return list(read_documents(source, errors=errors, **kwargs)), errors


def _warc_record(kind: str, block: bytes, content_type: str = "application/http; msgtype=response") -> bytes:
    head = (
        f"WARC/1.1\r\nWARC-Type: {kind}\r\nWARC-Target-URI: http://example.org/{kind}\r\n"
        f"WARC-Date: 2024-01-01T00:00:00Z\r\nWARC-Record-ID: <urn:uuid:0000-{kind}>\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def _http(status: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode() + body


@needs_web_data
def test_common_crawl_warc_yields_one_document_per_html_response():
    docs, errors = _read(CC_EXCERPT)
    # 50 records: warcinfo, then request / response / metadata per page, and one request without a response.
    assert len(docs) == 16
    assert errors.total == 0
    assert [d.id for d in docs[:3]] == [f"{CC_EXCERPT.name}:{n}" for n in (3, 6, 9)]
    russian = docs[1]
    assert russian.meta == {
        "url": "http://01spb.ru/company/",
        "date": "2020-08-08T18:31:12Z",
        "record_id": "<urn:uuid:e9e41f63-d478-42d0-bca8-1af2be3245a3>",
    }
    # Served as windows-1251: decoded with the declared charset, not as UTF-8 with replacement characters.
    assert "Стратегия пожарной безопасности" in russian.text
    assert "\ufffd" not in russian.text


@needs_web_data
def test_wget_warc_chunked_bodies_are_decoded_and_bracketed_uris_unwrapped():
    docs, errors = _read(WEB / "wget_warc" / "dolma_sample-0001.warc.gz")
    assert (len(docs), errors.total) == (15, 0)
    home = docs[0]  # stored with Transfer-Encoding: chunked; undecoded, the chunk size would lead the text
    assert home.meta["url"] == "https://creativecommons.org/"
    assert home.text.startswith("Better Sharing, Brighter Future\n\n")


@needs_web_data
def test_wet_conversion_record_is_a_document_and_wat_yields_nothing():
    docs, errors = _read(WEB / "cc_warc" / "whirlwind.warc.wet.gz")
    assert [d.id for d in docs] == ["whirlwind.warc.wet.gz:2"]
    assert docs[0].meta["url"] == "https://an.wikipedia.org/wiki/Escopete"
    assert docs[0].meta["language"] == "spa"
    assert docs[0].text.startswith("Escopete - Biquipedia, a enciclopedia libre\n")
    assert errors.total == 0
    wat_docs, wat_errors = _read(WEB / "cc_warc" / "whirlwind.warc.wat.gz")
    assert (wat_docs, wat_errors.total) == ([], 0)


@needs_web_data
def test_directory_walk_selects_warc_files_by_extension():
    docs, errors = _read(WEB, extensions=[".warc"])  # not the .wet / .wat files beside them
    assert len(docs) == 16 + 1 + 22 + 15
    assert errors.total == 0
    assert {d.id.split("/")[0] for d in docs} == {"cc_warc", "wget_warc"}


@needs_web_data
@pytest.mark.parametrize("cut", [70_000, -10])  # inside record 23; inside the last gzip member's trailer
def test_truncated_warc_gzip_keeps_earlier_documents_and_counts_once(tmp_path, cut):
    data = CC_EXCERPT.read_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[:cut])
    full, _ = _read(CC_EXCERPT)
    docs, errors = _read(path)
    kept = 7 if cut > 0 else 16
    assert [d.text for d in docs] == [d.text for d in full[:kept]]
    assert errors.count("corrupt compressed file") == 1
    assert errors.total == 1


@needs_web_data
def test_truncated_uncompressed_warc_is_one_error(tmp_path):
    path = tmp_path / "cut.warc"
    path.write_bytes(gzip.decompress(CC_EXCERPT.read_bytes())[:400_000])
    docs, errors = _read(path)
    assert len(docs) == 12
    assert errors.reasons == {"corrupt warc file": 1}


def test_warc_records_that_are_not_pages_are_counted_or_ignored(tmp_path):
    prose = "A paragraph of real prose about rivers. " * 5
    page = f"<html><body><article><p>{prose}</p></article></body></html>".encode()
    records = [
        _warc_record("warcinfo", b"software: test\r\n", "application/warc-fields"),
        _warc_record("request", b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "application/http; msgtype=request"),
        _warc_record("response", _http("200 OK", "image/png", b"\x89PNG\r\n\x1a\n\0\0")),
        _warc_record("response", _http("404 Not Found", "text/html", b"<html><p>Not found</p></html>")),
        _warc_record("response", _http("200 OK", "text/html", b"<html><body></body></html>")),
        _warc_record("response", _http("200 OK", "text/html", gzip.compress(page), "Content-Encoding: gzip\r\n")),
        _warc_record("metadata", b"fetchTimeMs: 12\r\n", "application/warc-fields"),
    ]
    path = tmp_path / "mixed.warc"
    path.write_bytes(b"".join(records))
    docs, errors = _read(path)
    assert [(d.id, d.meta["url"]) for d in docs] == [("mixed.warc:6", "http://example.org/response")]
    assert docs[0].text == prose.strip()
    assert errors.reasons == {"not html": 1, "http status 404": 1, "empty": 1}
    assert errors.messages[0] == f"{path}:3: not html"


def test_garbage_warc_is_one_error(tmp_path):
    path = tmp_path / "noise.warc"
    path.write_bytes(b"this is not an archive\n" * 10)
    assert _read(path)[1].reasons == {"corrupt warc file": 1}


def test_decode_html_charsets():
    text = "Grüße aus Köln"
    assert decode_html(text.encode("cp1252"), "ISO-8859-1") == text  # latin-1 label read as windows-1252
    assert decode_html(text.encode("utf-8"), "ISO-8859-1") == text  # a mislabelled UTF-8 page
    meta = '<meta charset="windows-1251"><p>Привет, мир</p>'
    assert decode_html(meta.encode("cp1251")) == meta  # no header: the meta tag
    assert decode_html(b"\xef\xbb\xbf<p>ok</p>") == "<p>ok</p>"  # the BOM is not text
    # No encoding reads these cleanly: one stray byte in a page is replaced, a page of them is rejected.
    stray = b"<p>" + b"plain ascii text " * 20 + b"\x81</p>"
    assert decode_html(stray).count("\ufffd") == 1
    assert decode_html(b"<p>" + b"\x81\x8d\x8f\x90\x9d" * 40 + b"</p>") is None


def test_undecodable_html_file_is_counted(tmp_path):
    path = tmp_path / "noise.html"
    path.write_bytes(b"<html><body><p>" + b"\x81\x8d\x8f\x90\x9d" * 40 + b"</p></body></html>")
    docs, errors = _read(path)
    assert docs == []
    assert errors.messages == [f"{path}: undecodable"]


@needs_web_data
def test_html_file_main_content_without_boilerplate():
    path = BENCH / "html" / f"{WEWORK}.html.gz"
    truth = json.loads((BENCH / "ground-truth.json").read_text(encoding="utf-8"))[WEWORK]["articleBody"]
    docs, errors = _read(path)
    assert [d.id for d in docs] == [path.name]
    assert errors.total == 0
    text = docs[0].text
    sentence = "A spokesperson for the NYAG declined to comment."
    assert sentence in truth and sentence in text
    assert text.startswith(truth[:200])
    for boilerplate in ("Follow VentureBeat on Twitter", "Privacy", "Image Credit"):
        assert boilerplate not in text


def test_empty_html_file_is_counted(tmp_path):
    path = tmp_path / "blank.htm"
    path.write_text("<html><head><title>t</title></head><body><nav>Home</nav></body></html>", encoding="utf-8")
    docs, errors = _read(path)
    assert docs == []
    assert errors.reasons == {"empty": 1}


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    texts = [f"row {i} text" for i in range(2500)]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(2500))})
    ds.save_to_disk(str(root / "single"), num_shards=2)
    dd = datasets.DatasetDict({"validation": ds.select([7, 3, 5]), "train": ds.select(range(4))})
    dd.save_to_disk(str(root / "dict"))
    return root, texts


def test_hf_dataset_round_trips_texts_and_order(hf_saved):
    root, texts = hf_saved
    docs, errors = _read(root / "single")
    assert [d.text for d in docs] == texts  # two shards, read in the order state.json lists them
    assert (docs[0].id, docs[-1].id) == ("single:1", "single:2500")
    assert errors.total == 0


def test_hf_dataset_dict_reads_splits_in_saved_order_or_one(hf_saved):
    root, texts = hf_saved
    docs, _ = _read(root / "dict")
    assert [(d.id, d.text) for d in docs] == [
        ("validation:1", texts[7]),
        ("validation:2", texts[3]),
        ("validation:3", texts[5]),
        ("train:1", texts[0]),
        ("train:2", texts[1]),
        ("train:3", texts[2]),
        ("train:4", texts[3]),
    ]
    train, _ = _read(root / "dict", hf_split="train")
    assert [d.id for d in train] == ["train:1", "train:2", "train:3", "train:4"]
    with pytest.raises(ValueError) as info:
        _read(root / "dict", hf_split="test")
    assert "no split 'test' (data.hf_split); splits present: ['validation', 'train']" in str(info.value)


def test_hf_dataset_missing_column_names_columns_present(hf_saved):
    root, _ = hf_saved
    with pytest.raises(ValueError) as info:
        next(read_documents(root / "dict", text_field="content"))
    message = str(info.value)
    assert "no column 'content' (data.text_field)" in message
    assert "columns present: ['n', 'text']" in message


def test_hf_split_on_other_sources_is_a_setting_error(hf_saved, tmp_path):
    root, _ = hf_saved
    with pytest.raises(ValueError, match="single saved Dataset"):
        _read(root / "single", hf_split="train")
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="not a dataset saved by DatasetDict"):
        _read(tmp_path / "a.txt", hf_split="train")


def test_truncated_arrow_file_keeps_earlier_rows_and_ends_the_split(hf_saved, tmp_path):
    import shutil

    root, texts = hf_saved
    copy = tmp_path / "single"
    shutil.copytree(root / "single", copy)
    first = copy / "data-00000-of-00002.arrow"
    first.write_bytes(first.read_bytes()[: first.stat().st_size * 9 // 10])  # inside the second batch
    docs, errors = _read(copy)
    assert len(docs) == 1000  # the first record batch (datasets writes 1000 rows a batch) of 1250 rows
    assert [d.text for d in docs] == texts[: len(docs)]
    assert errors.messages == [f"{first}: corrupt arrow file"]
