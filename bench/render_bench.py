"""Render throughput alone: one template, N personalized messages.

Usage: python bench/render_bench.py [N] [rsa|ed25519]   (default 50 000, unsigned)

With ``rsa`` or ``ed25519`` every message is also DKIM-signed (a fresh
2048-bit RSA or an Ed25519 key), which measures mailer.dkim's cost per message.

The message is ~2 KB: Cyrillic subject and names, a text and an HTML body with
{{name}}, {{email}}, a custom variable and the unsubscribe link, no attachment.
Prints "render: X msg/s, Y µs/msg" and exits 0.
"""

# Russian test content is intended: Cyrillic letters are not look-alikes here.

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailer.dkim import DkimSigner
from mailer.render import MessageTemplate, make_message_id

TEXT = (
    "Здравствуйте, {{name}}!\n\n"
    "Мы подготовили для вас подборку предложений недели. Ваш адрес: {{email}}.\n"
    "Ваш персональный промокод: {{promo}} — он действует до конца месяца.\n\n"
    + "Каталог обновляется каждый день, загляните к нам на сайт. "
    * 6
    + "\n\nС уважением,\nкоманда магазина\n\n"
    "Отписаться: {{unsubscribe_url}}\n"
)
HTML = (
    "<html><body><h1>Здравствуйте, {{name}}!</h1>"
    "<p>Мы подготовили для вас подборку предложений недели. Ваш адрес: {{email}}.</p>"
    "<p>Ваш персональный промокод: <b>{{promo}}</b> — он действует до конца месяца.</p>"
    + "<p>Каталог обновляется каждый день, загляните к нам на сайт.</p>"
    * 4
    + "<p>С уважением,<br>команда магазина</p>"
    '<p><a href="{{unsubscribe_url}}">Отписаться</a></p></body></html>'
)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    kind = sys.argv[2] if len(sys.argv) > 2 else ""
    signer = _signer(kind) if kind else None
    template = MessageTemplate(
        from_email="news@shop.example",
        from_name="Магазин «Пример»",
        subject="Подборка недели: скидки до 50%",
        text=TEXT,
        html=HTML,
        reply_to="support@shop.example",
        message_id_domain="shop.example",
        headers={"X-Campaign-Id": "42"},
        dkim=signer,
    )
    date = datetime.now(UTC)
    # Inputs prepared up front so the loop measures render() alone.
    names = ["Иван Петров", "Maria Ivanova", "Ольга", "John O'Brien"]
    recipients = [
        (
            f"user{i}@example.com",
            names[i % len(names)],
            {"promo": f"SALE{i:06d}"},
            make_message_id(42, i, "shop.example"),
            f"https://shop.example/u/{i:08d}?t=abcdef0123456789",
        )
        for i in range(n)
    ]
    size = 0
    start = time.perf_counter()
    for to_email, to_name, variables, message_id, url in recipients:
        size += len(
            template.render(
                to_email=to_email,
                to_name=to_name,
                variables=variables,
                message_id=message_id,
                date=date,
                unsubscribe_url=url,
            )
        )
    elapsed = time.perf_counter() - start
    print(
        f"render{' + DKIM ' + kind if kind else ''}: "
        f"{n / elapsed:,.0f} msg/s, {elapsed / n * 1e6:.1f} µs/msg "
        f"({n} messages, avg {size / n:,.0f} bytes)"
    )
    return 0


def _signer(kind: str) -> DkimSigner:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return DkimSigner.from_pem(pem, selector="bench", domain="shop.example")


if __name__ == "__main__":
    raise SystemExit(main())
