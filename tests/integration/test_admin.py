"""Admin commands against a real MariaDB: lists, CSV import, templates, enqueue."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendsystem import admin, release
from sendsystem.errors import ImportRowsError, TemplateError, UserError
from tests.harness.env import Env
from tests.harness.helpers import sql


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def news(env: Env) -> Env:
    admin.create_list(env.db, "news", "Nyheder <news@example.com>")
    return env


def test_list_create_refuses_duplicates_and_bad_from(news: Env) -> None:
    with pytest.raises(UserError, match="already exists"):
        admin.create_list(news.db, "news", "X <x@example.com>")
    with pytest.raises(UserError, match="--from"):
        admin.create_list(news.db, "other", "not an address")


def test_strict_import_names_every_bad_line_and_imports_nothing(news: Env) -> None:
    csv = write(news.tmp / "s.csv", "email,first_name\n"
                "anne@example.com,Anne\n"
                "not-an-address,Bo\n"
                "carl@example,Carl\n"
                "dora@example.com,Dora\n"
                "anne@EXAMPLE.com,Anne again\n")
    with pytest.raises(ImportRowsError) as info:
        admin.import_csv(news.db, "news", csv)
    lines = [line for line, _ in info.value.problems]
    assert lines == [3, 4, 6]
    assert "line 3" in str(info.value) and "--skip-invalid" in str(info.value)
    assert news.db.fetchall("list_all")[0]["total"] == 0


def test_lenient_import_and_reimport_updates_without_duplicates(news: Env) -> None:
    csv = write(news.tmp / "s.csv", "email,first_name\nanne@example.com,Anne\nbad,Bo\n")
    result = admin.import_csv(news.db, "news", csv, skip_invalid=True)
    assert (result.imported, [line for line, _ in result.bad]) == (1, [3])
    csv2 = write(news.tmp / "s2.csv", "Email,first_name\nANNE@example.com,Annie\n")
    admin.import_csv(news.db, "news", csv2)
    rows = news.db.fetchall("list_all")
    assert rows[0]["total"] == 1


def test_import_refuses_crlf_in_fields(news: Env) -> None:
    csv = write(news.tmp / "s.csv", 'email,first_name\nanne@example.com,"Anne\r\nBcc: x@y.z"\n')
    with pytest.raises(ImportRowsError, match="line break"):
        admin.import_csv(news.db, "news", csv)


def test_import_needs_email_column_and_known_list(news: Env) -> None:
    csv = write(news.tmp / "s.csv", "mail,name\na@example.com,A\n")
    with pytest.raises(UserError, match="no 'email' column"):
        admin.import_csv(news.db, "news", csv)
    with pytest.raises(UserError, match="no list named"):
        admin.import_csv(news.db, "nope", csv)


def test_template_syntax_error_is_refused_with_line(news: Env) -> None:
    html = write(news.tmp / "t.html", "<p>ok</p>\n<p>{{ first_name </p>\n")
    with pytest.raises(TemplateError, match="line 2"):
        admin.add_template(news.db, "t", "Hi", html, None)
    assert news.db.fetchone("template_by_name", {"name": "t"}) is None


@pytest.mark.parametrize(("html", "reason"), [
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
     "nested loops would run 10,000,000,000 times"),
    ("{{ 'x'|center(999999999) }}", "width 999999999 in the center filter"),
    ("{{ 'x'.ljust(10**9) }}", "width 1000000000 in str.ljust()"),
    ("{{ '%999999999s'|format(1) }}", "width 999999999 in the format filter"),
    ("{{ '{:>999999999}'.format(1) }}", "width 999999999 in a format field"),
    ("{{ 'x' * 10**7 }}", "repetition result too large"),
])
def test_template_add_refuses_hostile_literals_and_stores_nothing(news: Env, html: str,
                                                                  reason: str) -> None:
    path = write(news.tmp / "t.html", f"<p>Hej</p>\n{html}\n")
    code, out, err = news.cli("template", "add", "bomb", "--subject", "Hi", "--html", str(path))
    assert code == 1, (out, err)
    assert "html template, line 2: " in err and reason in err, err
    assert news.db.fetchone("template_by_name", {"name": "bomb"}) is None


def test_enqueue_validation_creates_nothing(news: Env) -> None:
    html = write(news.tmp / "t.html", "<p>Hi {{ email }}</p>")
    admin.add_template(news.db, "t", "Hi", html, None)
    with pytest.raises(UserError, match="no list named"):
        admin.enqueue(news.db, "nope", "t")
    with pytest.raises(UserError, match="no template named"):
        admin.enqueue(news.db, "news", "nope")
    with pytest.raises(UserError, match="--attach"):
        admin.enqueue(news.db, "news", "t", attachments=(news.tmp / "missing.pdf",))
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        admin.enqueue(news.db, "news", "t", at="tomorrow")
    assert news.db.fetchone("newsletter_get", {"id": 1}) is None


def test_enqueue_creates_one_message_per_active_subscriber(news: Env) -> None:
    csv = write(news.tmp / "s.csv", "email\n" + "".join(f"u{i}@example.com\n" for i in range(50)))
    admin.import_csv(news.db, "news", csv)
    html = write(news.tmp / "t.html", "<p>Hi</p>")
    admin.add_template(news.db, "t", "Hi", html, None)
    pdf = news.tmp / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4 test")
    nid, created = admin.enqueue(news.db, "news", "t", attachments=(pdf, pdf))
    assert created == 50
    nl = admin.get_newsletter(news.db, nid)
    assert (nl["state"], nl["total"], nl["attachment_count"]) == ("running", 50, 2)


def test_scheduled_newsletter_is_not_released_early(news: Env) -> None:
    html = write(news.tmp / "t.html", "<p>Hi</p>")
    admin.add_template(news.db, "t", "Hi", html, None)
    nid, created = admin.enqueue(news.db, "news", "t", at="2999-01-01 09:00")
    assert created == 0
    assert admin.get_newsletter(news.db, nid)["state"] == "scheduled"


def test_block_patterns(news: Env) -> None:
    assert admin.block_add(news.db, "Spam@Example.COM")
    assert admin.block_add(news.db, "@Example.ORG")
    assert not admin.block_add(news.db, "spam@example.com")
    patterns = [r["pattern"] for r in news.db.fetchall("block_list")]
    assert patterns == ["@example.org", "Spam@example.com"]
    with pytest.raises(UserError):
        admin.block_add(news.db, "@not a domain")


def test_release_in_id_ranges_with_progress(news: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = write(news.tmp / "s.csv", "email\n" + "".join(f"u{i}@example.com\n" for i in range(50)))
    admin.import_csv(news.db, "news", csv)
    news.db.execute("subscriber_set_status", {"id": 3, "status": "unsubscribed",
                                            "reason": "admin"})
    html = write(news.tmp / "t.html", "<p>Hi</p>")
    admin.add_template(news.db, "t", "Hi", html, None)
    monkeypatch.setattr(release, "RELEASE_CHUNK", 7)
    seen: list[int] = []
    nid, created = admin.enqueue(news.db, "news", "t", progress=seen.append)
    assert created == 49 and sum(seen) == 50 and len(seen) == 8
    assert admin.get_newsletter(news.db, nid)["total"] == 49


def test_import_names_a_field_over_the_csv_limit(news: Env) -> None:
    """`_csv.Error: field larger than field limit` is a bad line, not a traceback."""
    big = "x" * 140_000
    csv = write(news.tmp / "big.csv", "email,first_name\n"
                "anne@example.com,Anne\n"
                f"bo@example.com,{big}\n"
                "carl@example.com,Carl\n"
                f'dora@example.com,"never closed\n{big}\n'
                "erik@example.com,Erik\n")
    code, out, err = news.cli("list", "import", "news", str(csv))
    assert code == 1, out + err
    assert "Traceback" not in err
    assert "line 3: a field is longer than 131072 characters" in err
    assert "line 5: a field is longer than 131072 characters" in err
    assert "nothing was imported" in err
    assert news.db.fetchall("list_all")[0]["total"] == 0
    # --skip-invalid imports the good rows around them.
    code, out, err = news.cli("list", "import", "news", str(csv), "--skip-invalid")
    assert code == 0, out + err
    assert "line 3: a field is longer than 131072 characters" in err
    emails = {r["email"] for r in sql(news, "SELECT email FROM subscribers")}
    assert emails == {"anne@example.com", "carl@example.com", "erik@example.com"}


def test_import_header_over_the_csv_limit_is_a_user_error(news: Env) -> None:
    csv = write(news.tmp / "big.csv", "email," + "y" * 140_000 + "\na@example.com,1\n")
    with pytest.raises(UserError, match=r"header row.*longer than 131072"):
        admin.import_csv(news.db, "news", csv)
