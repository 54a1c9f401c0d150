"""The sample newsletter: a ~20 KB HTML + text template with a ten-article loop, and a PDF.

The articles are data the template defines itself with ``{% set %}`` (a
template may), so every recipient gets the full loop merged with their own
five fields. ``LIST_NAME`` and ``TEMPLATE_NAME`` are the names the demo (and
bench/pipeline.py) store the list and the template under.
"""

from __future__ import annotations

from dataclasses import dataclass

from .subscribers import ASCII_FOLD

LIST_NAME = "demo"
TEMPLATE_NAME = "demo-newsletter"

_SENTENCES = (
    "Vi har samlet ugens vigtigste historier, så du hurtigt kan komme ajour.",
    "Foråret er kommet til hele landet, og med det en stribe nye arrangementer.",
    "Vores redaktion har talt med lokale ildsjæle om, hvad der rører sig lige nu.",
    "Mange læsere har skrevet til os med gode idéer, og her er et udvalg af dem.",
    "Prøv den nye opskrift på rugbrød med solsikkekerner og lidt ekstra tid i ovnen.",
    "Cykelstierne langs kysten er blevet forbedret, og turen er nu skiltet hele vejen.",
    "Bibliotekerne åbner for lange aftener med oplæsning, kaffe og brætspil.",
    "Et nyt fællesskab for havefolk deler frø, stiklinger og gode råd om kompost.",
    "Elbilerne bliver flere, og ladestanderne følger med i både by og på land.",
    "Sommerens koncerter er offentliggjort, og billetterne sælges allerede nu.",
    "Vi ser nærmere på, hvordan man sparer på varmen uden at gå på kompromis.",
    "Læs også interviewet med den unge keramiker, der har skabt en hel bevægelse.",
)
_CATEGORIES = ("Lokalt", "Mad", "Natur", "Kultur", "Bolig", "Fritid", "Teknik", "Sundhed",
               "Rejser", "Økonomi")
_TITLES = (
    "Fem ture du skal nå før sommerferien", "Rugbrød som din mormor bagte det",
    "Havens bedste venner: bier og humlebier", "Ny sæson på de små spillesteder",
    "Sådan får du et lunere hjem for færre kroner", "Weekendhygge med hele familien",
    "Apps der gør hverdagen lettere", "Motion der passer ind i en travl uge",
    "Skjulte perler på de danske øer", "Budgettet efter sommerferien",
)


def _articles_literal() -> str:
    """The ten articles as a Jinja list literal (templates may define their own data)."""
    items = []
    for i, title in enumerate(_TITLES):
        teaser = " ".join(_SENTENCES[(i + k) % len(_SENTENCES)] for k in range(6))
        items.append(
            f'{{"title": "{title}", "category": "{_CATEGORIES[i]}", '
            f'"minutes": {3 + i % 5}, "slug": "artikel-{i + 1}", "teaser": "{teaser}"}}'
        )
    return "[\n    " + ",\n    ".join(items) + "\n]"


DEMO_SUBJECT = "{{ first_name }}, ugens nyheder fra {{ list.name }} ({{ city }})"

_HTML = """{% set articles = ARTICLES %}<!DOCTYPE html>
<html lang="da"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ newsletter.subject }}</title>
<style>
  body {
    margin: 0;
    padding: 0;
    background: #eef2f5;
    font-family: Georgia, 'Times New Roman', serif;
    color: #1f2d3a;
  }
  .wrap { max-width: 640px; margin: 0 auto; background: #ffffff; }
  .masthead { background: #12395b; color: #ffffff; padding: 28px 32px; }
  .masthead h1 { margin: 0; font-size: 28px; letter-spacing: 0.5px; }
  .masthead p {
    margin: 6px 0 0;
    color: #b9d3ea;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 13px;
  }
  .intro { padding: 24px 32px 8px; font-size: 17px; line-height: 1.55; }
  .card { margin: 16px 32px; padding: 18px 20px; border: 1px solid #dde5ec; border-radius: 8px; }
  .card .cat {
    font-family: Helvetica, Arial, sans-serif;
    font-size: 11px;
    text-transform: uppercase;
    letter-spacing: 1px;
    color: #c0542c;
  }
  .card h2 { margin: 6px 0 8px; font-size: 21px; line-height: 1.25; color: #12395b; }
  .card p { margin: 0 0 12px; font-size: 15px; line-height: 1.6; }
  .button {
    display: inline-block;
    padding: 9px 16px;
    background: #c0542c;
    color: #ffffff !important;
    text-decoration: none;
    border-radius: 4px;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 13px;
  }
  .meta { font-family: Helvetica, Arial, sans-serif; font-size: 12px; color: #6b7c8c; }
  .offer {
    margin: 24px 32px;
    padding: 20px;
    background: #fdf3e7;
    border-left: 4px solid #c0542c;
    font-size: 15px;
    line-height: 1.55;
  }
  .footer {
    padding: 24px 32px 32px;
    background: #f4f7f9;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 12px;
    line-height: 1.6;
    color: #6b7c8c;
  }
  .footer a { color: #12395b; }
</style></head>
<body>
<table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr><td>
<div class="wrap">
  <div class="masthead">
    <h1>{{ list.name | title }} Nyt</h1>
    <p>Nyhedsbrev nr. {{ newsletter.id }} &middot;
    til {{ first_name }} {{ last_name }} i {{ city }}</p>
  </div>
  <div class="intro">
    <p>Kære {{ first_name }},</p>
    <p>Tak fordi du har været medlem siden {{ member_since }}. Her er ugens udvalgte historier
    fra {{ city }} og resten af landet &ndash; god fornøjelse med læsningen.</p>
  </div>
{% for a in articles %}
  <div class="card">
    <div class="cat">{{ a.category }} &middot; {{ a.minutes }} min. læsning</div>
    <h2>{{ loop.index }}. {{ a.title }}</h2>
    <p>{{ a.teaser }}</p>
    <p class="meta">Udvalgt til dig, {{ first_name }}, fordi du bor i {{ city }}.</p>
    <a class="button" href="https://news.example.com/{{ a.slug
      }}?utm_source=nyhedsbrev&amp;utm_medium=email&amp;id={{ newsletter.id }}">Læs
      hele artiklen</a>
  </div>
{% endfor %}
  <div class="offer">
    <strong>Særligt for {{ plan }}-medlemmer:</strong> Som {{ plan }}-medlem får du 20 % rabat
    på alle arrangementer i {{ city }} resten af måneden. Se kataloget i den vedhæftede PDF.
  </div>
  <div class="footer">
    <p>Du modtager denne e-mail som medlem af {{ list.name }} på {{ email }}.</p>
    <p><a href="{{ unsubscribe_url }}">Afmeld nyhedsbrevet</a> med ét klik &middot;
    <a href="https://news.example.com/profil">Ret dine oplysninger</a></p>
    <p>{{ list.name | title }} Nyt &middot; Nørregade 7 &middot; 1165 København K</p>
  </div>
</div>
</td></tr></table>
</body></html>
"""

_TEXT = """{% set articles = ARTICLES %}{{ list.name | title }} Nyt - nyhedsbrev nr. {{
newsletter.id }}

Kære {{ first_name }},

Tak fordi du har været medlem siden {{ member_since }}. Her er ugens udvalgte
historier fra {{ city }} og resten af landet.
{% for a in articles %}
{{ loop.index }}. {{ a.title }} ({{ a.category }}, {{ a.minutes }} min.)
{{ a.teaser }}
Læs mere: https://news.example.com/{{ a.slug }}
{% endfor %}
Særligt for {{ plan }}-medlemmer: 20 % rabat på arrangementer i {{ city }}.

Afmeld: {{ unsubscribe_url }}
"""


@dataclass(frozen=True)
class SampleNewsletter:
    subject: str
    html: str
    text: str
    attachment_name: str
    attachment: bytes


def sample_newsletter() -> SampleNewsletter:
    """The demo newsletter: ~18 KB of HTML and text per recipient plus a ~2 KB PDF."""
    articles = _articles_literal()
    return SampleNewsletter(
        subject=DEMO_SUBJECT, html=_HTML.replace("ARTICLES", articles, 1),
        text=_TEXT.replace("ARTICLES", articles, 1), attachment_name="katalog.pdf",
        attachment=sample_pdf(),
    )


def sample_pdf(title: str = "Sommerkatalog - medlemstilbud") -> bytes:
    """A small but valid one-page PDF (built by hand: no PDF library needed)."""
    lines = [title, ""] + [f"{i + 1}. {t}".translate(ASCII_FOLD) for i, t in enumerate(_TITLES)]
    text = "BT /F1 20 Tf 56 780 Td 24 TL " + " ".join(
        f"({line.replace('(', '[').replace(')', ']')}) '" for line in lines) + " ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode("latin-1")),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe6\xf8\xe5\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)
