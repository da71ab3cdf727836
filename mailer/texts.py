"""Every text a user reads, in one place: Russian by default, English available.

Codes are stable API; texts may change. ``text(code, lang, **values)`` fills
the placeholders; an unknown language falls back to Russian.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_LANG", "TEXTS", "Lang", "text"]

Lang = Literal["ru", "en"]
DEFAULT_LANG: Lang = "ru"

TEXTS: dict[str, dict[Lang, str]] = {
    # Why a campaign waits (reason_code of the manager's view).
    "daily_limit": {
        "ru": "Вы достигли дневного лимита {sent}/{limit}. Продолжим завтра в 09:00 МСК.",
        "en": "You reached your daily limit of {sent}/{limit}. We continue tomorrow at 09:00 MSK.",
    },
    "quota_exhausted": {
        "ru": "Глобальная квота исчерпана. Администратор пополнит квоту, "
        "после чего рассылка продолжится автоматически.",
        "en": "The global quota is exhausted. Sending resumes by itself once an "
        "administrator tops it up.",
    },
    "rate_per_hour": {
        "ru": "Достигнут лимит {limit} писем/час. Продолжим в {next_hour}:00.",
        "en": "The limit of {limit} emails/hour is reached. We continue at {next_hour}:00.",
    },
    "outside_hours": {
        "ru": "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК.",
        "en": "Outside working hours (9:00-18:00 MSK). We continue tomorrow at 09:00 MSK.",
    },
    "transient_error": {
        "ru": "Временная ошибка отправки. Повторим попытку через 5 минут.",
        "en": "Temporary sending error. We retry in 5 minutes.",
    },
    "empty_campaign": {
        "ru": "Нет писем в очереди",
        "en": "No emails in the queue",
    },
    # The visible link in every message (RFC 8058 headers carry it too).
    "unsubscribe_footer": {
        "ru": "Отписаться от рассылки",
        "en": "Unsubscribe",
    },
    # Errors of the API.
    "bad_request": {
        "ru": "Некорректный запрос: {detail}",
        "en": "Malformed request: {detail}",
    },
    "validation_error": {
        "ru": "Неверные данные: {detail}",
        "en": "Invalid data: {detail}",
    },
    "unauthenticated": {
        "ru": "Не указан пользователь (заголовок Mailer-User).",
        "en": "No acting user given (header Mailer-User).",
    },
    "forbidden": {
        "ru": "Недостаточно прав: изменять кампанию может только её владелец или администратор.",
        "en": "Not allowed: only the campaign's owner or an admin may change it.",
    },
    "not_found": {
        "ru": "Кампания {campaign_id} не найдена.",
        "en": "Campaign {campaign_id} not found.",
    },
    "invalid_state": {
        "ru": "Действие невозможно: кампания в статусе «{status}».",
        "en": "Not possible: the campaign is {status}.",
    },
    "too_many_recipients": {
        "ru": "В кампании {count} получателей, максимум {limit}. Разделите её на несколько.",
        "en": "The campaign has {count} recipients, at most {limit} allowed. Split it.",
    },
    "too_many_in_one_call": {
        "ru": "За один раз можно добавить не больше {limit} адресов.",
        "en": "At most {limit} addresses may be added in one call.",
    },
    "throttle_backend_unavailable": {
        "ru": "Сервис временно недоступен. Попробуйте позже.",
        "en": "The service is temporarily unavailable. Try again later.",
    },
    "internal_error": {
        "ru": "Внутренняя ошибка сервиса. Мы уже разбираемся.",
        "en": "Internal service error. We are on it.",
    },
}


def text(code: str, lang: str | None = None, **values: object) -> str:
    variants = TEXTS.get(code)
    if variants is None:
        return code
    template = variants["en"] if lang == "en" else variants[DEFAULT_LANG]
    try:
        return template.format(**values)
    except (KeyError, IndexError):
        return template
