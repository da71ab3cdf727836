"""Every text a user reads, in one place: Russian by default, English available.

Codes are stable API; texts may change. ``text(code, lang, **values)`` fills
the placeholders; an unknown language falls back to Russian.

Values that come from settings or from the calendar are worded here too, so
no caller writes "завтра" or "5 минут" of its own: ``resume_phrase`` (when a
deferral ends: "сегодня"/"завтра"/a weekday and date, the time, the zone),
``duration_phrase`` (a delay with its Russian plural), ``working_time`` and
``tz_label`` (the configured working hours and their zone). ``reason_values``
gathers them for a reason text, so the manager's view and the owner's
notification word a deferral alike.
"""

from __future__ import annotations

import math
import string
from datetime import datetime, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

from mailer.config import Settings

__all__ = [
    "ACCOUNT_REASONS",
    "DEFAULT_LANG",
    "TEXTS",
    "Lang",
    "at_phrase",
    "duration_phrase",
    "fields_of",
    "reason_key",
    "reason_values",
    "resume_phrase",
    "text",
    "tz_label",
    "working_time",
]

Lang = Literal["ru", "en"]
DEFAULT_LANG: Lang = "ru"

TEXTS: dict[str, dict[Lang, str]] = {
    # Why a campaign waits (reason_code of the manager's view).
    # {until}: when sending goes on, as ``resume_phrase`` words it ("завтра в 09:00
    # МСК"); a caller without the calendar may give a plain date and time instead.
    "daily_limit": {
        "ru": "Вы достигли дневного лимита {sent}/{limit}. Продолжим {until}.",
        "en": "You reached your daily limit of {sent}/{limit}. We continue {until}.",
    },
    "quota_exhausted": {
        "ru": "Глобальная квота исчерпана. Администратор пополнит квоту, "
        "после чего рассылка продолжится автоматически.",
        "en": "The global quota is exhausted. Sending resumes by itself once an "
        "administrator tops it up.",
    },
    # {at}: "в 14:00" today in the service's zone, else with the day and zone
    # ("завтра в 09:00 МСК": an hour reached at 17:10 resumes at the next opening).
    "rate_per_hour": {
        "ru": "Достигнут лимит {limit} писем/час. Продолжим {at}.",
        "en": "The limit of {limit} emails/hour is reached. We continue {at}.",
    },
    # {start}-{end} {tz}: the configured working hours (``hours_phrase``, ``tz_label``).
    "outside_hours": {
        "ru": "Сейчас вне рабочего времени ({start}-{end} {tz}). Продолжим {until}.",
        "en": "Outside working hours ({start}-{end} {tz}). We continue {until}.",
    },
    # {retry_in}: what is left of the wait (the configured retry delay, or the
    # SMTP breaker's own), as ``duration_phrase`` words it.
    "transient_error": {
        "ru": "Временная ошибка отправки. Повторим попытку через {retry_in}.",
        "en": "Temporary sending error. We retry in {retry_in}.",
    },
    # The same reason when the retry waits for working hours (``reason_key``).
    "transient_error_later": {
        "ru": "Временная ошибка отправки. Повторим попытку {until}.",
        "en": "Temporary sending error. We retry {until}.",
    },
    # The same reasons with several SMTP accounts (MAILER_SMTP_ACCOUNTS): each
    # names the account whose limit, quota or server the campaign waits for
    # (``reason_key`` with ``account``).
    "rate_per_hour_account": {
        "ru": "Достигнут лимит {limit} писем/час SMTP-аккаунта «{account}». Продолжим {at}.",
        "en": "The limit of {limit} emails/hour of SMTP account “{account}” is reached. "
        "We continue {at}.",
    },
    "quota_exhausted_account": {
        "ru": "Квота SMTP-аккаунта «{account}» исчерпана. Администратор пополнит квоту, "
        "после чего рассылка продолжится автоматически.",
        "en": "The quota of SMTP account “{account}” is exhausted. Sending resumes by itself "
        "once an administrator tops it up.",
    },
    "transient_error_account": {
        "ru": "Временная ошибка отправки через SMTP-аккаунт «{account}». "
        "Повторим попытку через {retry_in}.",
        "en": "Temporary sending error on SMTP account “{account}”. We retry in {retry_in}.",
    },
    "transient_error_later_account": {
        "ru": "Временная ошибка отправки через SMTP-аккаунт «{account}». Повторим попытку {until}.",
        "en": "Temporary sending error on SMTP account “{account}”. We retry {until}.",
    },
    "circuit_breaker_account": {
        "ru": "Рассылка приостановлена после {threshold} временных ошибок отправки подряд через "
        "SMTP-аккаунт «{account}». Проверьте SMTP-сервер и возобновите рассылку.",
        "en": "Sending paused after {threshold} temporary sending errors in a row on SMTP "
        "account “{account}”. Check the SMTP server and resume the campaign.",
    },
    # A start with send_at: the campaign waits for its time.
    "scheduled": {
        "ru": "Рассылка запланирована: отправка начнётся {until}.",
        "en": "Scheduled: sending starts {until}.",
    },
    "empty_campaign": {
        "ru": "Нет писем в очереди",
        "en": "No emails in the queue",
    },
    "circuit_breaker": {
        "ru": "Рассылка приостановлена после {threshold} временных ошибок отправки подряд. "
        "Проверьте SMTP-сервер и возобновите рассылку.",
        "en": "Sending paused after {threshold} temporary sending errors in a row. "
        "Check the SMTP server and resume the campaign.",
    },
    # The engine could not build the campaign's message (its subject, bodies or
    # attachments): it is paused so the queue goes on, until its owner fixes it.
    "render_error": {
        "ru": "Рассылка приостановлена: письмо не удаётся собрать (тема, текст или вложения). "
        "Исправьте кампанию и возобновите рассылку.",
        "en": "Sending paused: the message cannot be built (subject, body or attachments). "
        "Fix the campaign and resume it.",
    },
    "paused": {
        "ru": "Рассылка приостановлена вручную. Возобновите её, когда будете готовы.",
        "en": "The campaign was paused by hand. Resume it when you are ready.",
    },
    # Warnings a manager sees when a start is accepted.
    "warning_large_campaign": {
        "ru": "Большая кампания: {count} {count:plural:получатель|получателя|получателей}. "
        "При лимите {rate} писем/час отправка займёт около {hours} ч.",
        "en": "A large campaign: {count} {count:plural:recipient|recipients}. "
        "At {rate} emails/hour sending "
        "takes about {hours} h.",
    },
    # The same, from the forecast, when it takes more than one working day.
    "warning_large_campaign_days": {
        "ru": "Большая кампания: {count} {count:plural:получатель|получателя|получателей}. "
        "При лимите {rate} писем/час отправка займёт около {days} "
        "{days:plural:рабочего дня|рабочих дней|рабочих дней}, до {until}.",
        "en": "A large campaign: {count} {count:plural:recipient|recipients}. "
        "At {rate} emails/hour sending takes about {days} working "
        "{days:plural:day|days}, until {until}.",
    },
    # ...and when the forecast cannot know (the quota is exhausted).
    "warning_large_campaign_unknown": {
        "ru": "Большая кампания: {count} {count:plural:получатель|получателя|получателей}. "
        "При лимите {rate} писем/час срок отправки сейчас не определить: квота исчерпана.",
        "en": "A large campaign: {count} {count:plural:recipient|recipients}. "
        "At {rate} emails/hour its duration cannot be known now: the quota is exhausted.",
    },
    "warning_quota_exhausted": {
        "ru": "Глобальная квота исчерпана: кампания поставлена в очередь, отправка начнётся "
        "после пополнения квоты.",
        "en": "The global quota is exhausted: the campaign is queued and starts sending "
        "once the quota is topped up.",
    },
    "warning_scheduled_outside_hours": {
        "ru": "Запланированное время вне рабочего времени ({start}-{end} {tz}): "
        "отправка начнётся {until}.",
        "en": "The scheduled time is outside working hours ({start}-{end} {tz}): "
        "sending starts {until}.",
    },
    "warning_outside_hours": {
        "ru": "Сейчас нерабочее время ({start}-{end} {tz}): кампания поставлена в очередь, "
        "отправка начнётся {until}.",
        "en": "Outside working hours ({start}-{end} {tz}): the campaign is queued and "
        "starts sending {until}.",
    },
    # A test email's subject starts with this, so nobody takes it for the real one.
    "test_subject_prefix": {
        "ru": "[ТЕСТ] ",
        "en": "[TEST] ",
    },
    # The visible link in every message (RFC 8058 headers carry it too).
    "unsubscribe_footer": {
        "ru": "Отписаться от рассылки",
        "en": "Unsubscribe",
    },
    # The unsubscribe pages behind that link ({email} is shown masked).
    "unsubscribe_page_title": {
        "ru": "Отписка от рассылки",
        "en": "Unsubscribe",
    },
    "unsubscribe_page_question": {
        "ru": "Отписать адрес {email} от наших рассылок?",
        "en": "Unsubscribe {email} from our mailings?",
    },
    "unsubscribe_page_button": {
        "ru": "Отписаться",
        "en": "Unsubscribe",
    },
    "unsubscribe_page_done_title": {
        "ru": "Вы отписаны",
        "en": "You are unsubscribed",
    },
    "unsubscribe_page_done": {
        "ru": "Адрес {email} больше не будет получать наши рассылки.",
        "en": "The address {email} will no longer receive our mailings.",
    },
    "unsubscribe_page_invalid_title": {
        "ru": "Ссылка недействительна",
        "en": "Invalid link",
    },
    "unsubscribe_page_invalid": {
        "ru": "Ссылка для отписки повреждена или неполная. "
        "Откройте её из письма целиком, не изменяя.",
        "en": "This unsubscribe link is damaged or incomplete. "
        "Open it from the email in full, unchanged.",
    },
    "unsubscribe_page_error_title": {
        "ru": "Не получилось",
        "en": "Something went wrong",
    },
    "unsubscribe_page_error": {
        "ru": "Не удалось сохранить отписку. Попробуйте ещё раз через несколько минут.",
        "en": "We could not record your unsubscribe. Please try again in a few minutes.",
    },
    # Owner notifications (events.notify) where no reason text above fits.
    "notify_deferred_until": {
        "ru": "Рассылка {campaign_id} отложена ({reason}) до {until_at}.",
        "en": "Campaign {campaign_id} is deferred ({reason}) until {until_at}.",
    },
    "notify_deferred": {
        "ru": "Рассылка {campaign_id} отложена ({reason}).",
        "en": "Campaign {campaign_id} is deferred ({reason}).",
    },
    "notify_paused": {
        "ru": "Рассылка {campaign_id} приостановлена ({reason}). "
        "Возобновите её, когда будете готовы.",
        "en": "Campaign {campaign_id} is paused ({reason}). Resume it when you are ready.",
    },
    "notify_completed_with_errors": {
        "ru": "Рассылка {campaign_id} завершена с ошибками: отправлено {sent}, "
        "не доставлено {failed}. Подробности в отчёте кампании.",
        "en": "Campaign {campaign_id} finished with errors: {sent} sent, {failed} not "
        "delivered. See the campaign's report.",
    },
    # Campaign statuses as people read them (errors name the current one).
    "status_draft": {"ru": "черновик", "en": "draft"},
    "status_ready": {"ru": "в очереди", "en": "queued"},
    "status_sending": {"ru": "отправляется", "en": "sending"},
    "status_paused": {"ru": "приостановлена", "en": "paused"},
    "status_sent": {"ru": "отправлена", "en": "sent"},
    "status_completed_with_errors": {
        "ru": "завершена с ошибками",
        "en": "completed with errors",
    },
    "status_cancelled": {"ru": "отменена", "en": "cancelled"},
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
    "resolve_retry_warning": {
        "ru": "Внимание: эти письма будут отправлены повторно. Если сервер уже принял их, "
        "получатели получат письмо дважды.",
        "en": "Warning: these messages will be sent again. If the server already took "
        "them, the recipients get the message twice.",
    },
    "send_at_invalid": {
        "ru": "Неверное время запуска send_at: {reason}.",
        "en": "Invalid start time send_at: {reason}.",
    },
    "not_scheduled": {
        "ru": "Кампания не ждёт запланированного запуска (статус «{status}»).",
        "en": "The campaign is not waiting for a scheduled start (it is {status}).",
    },
    "invalid_state": {
        "ru": "Действие невозможно: кампания в статусе «{status}».",
        "en": "Not possible: the campaign is {status}.",
    },
    "too_many_recipients": {
        "ru": "В кампании {count} {count:plural:получатель|получателя|получателей}, "
        "максимум {limit}. Разделите её на несколько.",
        "en": "The campaign has {count} {count:plural:recipient|recipients}, "
        "at most {limit} allowed. Split it.",
    },
    "recipients_limit": {
        "ru": "Адреса не добавлены: в кампании стало бы {count} "
        "{count:plural:получатель|получателя|получателей}, максимум {limit}. "
        "Разделите её на несколько.",
        "en": "Nothing added: the campaign would have {count} "
        "{count:plural:recipient|recipients}, at most {limit} allowed. Split it.",
    },
    "too_many_in_one_call": {
        "ru": "За один раз можно добавить не больше {limit} адресов.",
        "en": "At most {limit} addresses may be added in one call.",
    },
    "throttle_backend_unavailable": {
        "ru": "Сервис временно недоступен. Попробуйте позже.",
        "en": "The service is temporarily unavailable. Try again later.",
    },
    "payload_too_large": {
        "ru": "Запрос слишком большой: {size} байт, максимум {limit}.",
        "en": "The request is too large: {size} bytes, at most {limit}.",
    },
    "forbidden_admin": {
        "ru": "Недостаточно прав: это действие доступно только администратору.",
        "en": "Not allowed: only an admin may do this.",
    },
    "forbidden_other_owner": {
        "ru": "Недостаточно прав: чужие кампании видит только администратор.",
        "en": "Not allowed: only an admin may see other users' campaigns.",
    },
    "campaign_sending": {
        "ru": "Кампания сейчас отправляется, удалить её нельзя. "
        "Сначала приостановите или отмените её.",
        "en": "The campaign is sending and cannot be deleted. Pause or cancel it first.",
    },
    "campaign_busy": {
        "ru": "Кампания ещё останавливается. Повторите через минуту.",
        "en": "The campaign is still stopping. Try again in a minute.",
    },
    "unknown_account": {
        "ru": "SMTP-аккаунт «{account}» не настроен ({field}). Настроены: {accounts}.",
        "en": "SMTP account “{account}” is not configured ({field}). Configured: {accounts}.",
    },
    "backup_is_account": {
        "ru": "Резервный SMTP-аккаунт «{account}» совпадает с основным: укажите другой.",
        "en": "The backup SMTP account “{account}” is the campaign's own account: name another.",
    },
    "nothing_to_update": {
        "ru": "Не указано ни одного поля для изменения.",
        "en": "No field to change was given.",
    },
    "body_required": {
        "ru": "Нужно тело письма: текст, HTML или оба.",
        "en": "A body is required: text, HTML or both.",
    },
    "subject_placeholders": {
        "ru": "Подстановки в теме письма не поддерживаются: уберите {{{{...}}}} из темы.",
        "en": "Placeholders in the subject are not supported: remove {{{{...}}}} from it.",
    },
    "invalid_email": {
        "ru": "Неверный адрес «{email}»: {reason}.",
        "en": "Invalid address {email!r}: {reason}.",
    },
    "attachment_too_large": {
        "ru": "Вложение «{filename}» занимает {size} байт, максимум {limit}.",
        "en": "The attachment {filename!r} is {size} bytes, at most {limit} allowed.",
    },
    "attachments_total_too_large": {
        "ru": "Вложения кампании вместе заняли бы {total} байт, максимум {limit}.",
        "en": "The campaign's attachments would total {total} bytes, at most {limit} allowed.",
    },
    "import_not_found": {
        "ru": "Файл {object} не найден среди загруженных для импорта: загрузите его снова.",
        "en": "File {object} is not among the uploads for import: upload it again.",
    },
    "import_unreadable": {
        "ru": "Файл не прочитать: {reason}. Ничего не добавлено.",
        "en": "The file cannot be read: {reason}. Nothing was added.",
    },
    "attachment_not_found": {
        "ru": "Вложение {attachment_id} не найдено в кампании {campaign_id}.",
        "en": "Attachment {attachment_id} not found in campaign {campaign_id}.",
    },
    "throttled_start": {
        "ru": "Слишком много запусков рассылок: не больше {limit} в час. "
        "Попробуйте снова через {minutes} мин.",
        "en": "Too many campaign starts: at most {limit} per hour. Try again in {minutes} min.",
    },
    "throttled_test_email": {
        "ru": "Слишком много тестовых писем: не больше {limit} в час. "
        "Попробуйте снова через {minutes} мин.",
        "en": "Too many test emails: at most {limit} per hour. Try again in {minutes} min.",
    },
    "governor_unavailable": {
        "ru": "Не удалось получить разрешение на отправку: сервис лимитов не отвечает. "
        "Попробуйте позже.",
        "en": "No permission to send could be obtained: the rate governor does not answer. "
        "Try again later.",
    },
    "sender_unavailable": {
        "ru": "Отправка писем временно недоступна. Попробуйте позже.",
        "en": "Sending is temporarily unavailable. Try again later.",
    },
    "test_email_failed": {
        "ru": "Тестовое письмо не отправлено: {error}",
        "en": "The test email was not sent: {error}",
    },
    "quota_not_local": {
        "ru": "Квоту можно задать только для локального учёта (MAILER_QUOTA_PROVIDER=local): "
        "квоту провайдера меняет сам провайдер.",
        "en": "The quota can only be set for local accounting (MAILER_QUOTA_PROVIDER=local): "
        "the provider's quota is the provider's to change.",
    },
    "quota_sync_unavailable": {
        "ru": "Синхронизация квоты сейчас недоступна. Попробуйте позже.",
        "en": "Quota sync is unavailable right now. Try again later.",
    },
    "quota_sync_failed": {
        "ru": "Не удалось синхронизировать квоту: {detail}",
        "en": "The quota sync failed: {detail}",
    },
    "internal_error": {
        "ru": "Внутренняя ошибка сервиса. Мы уже разбираемся.",
        "en": "Internal service error. We are on it.",
    },
}

# The manager's view says "empty" when nothing is queued: the same words as the
# start refusal, one definition.
TEXTS["empty"] = TEXTS["empty_campaign"]

# What the `mailer` command line prints (mailer/commands/): --lang en for English.
TEXTS.update(
    {
        "cli_created": {
            "ru": "Кампания {id} создана (черновик).",
            "en": "Campaign {id} created (draft).",
        },
        "cli_attached": {
            "ru": "Вложение «{filename}» добавлено ({size} байт).",
            "en": "Attachment {filename!r} added ({size} bytes).",
        },
        "cli_campaign_line": {
            "ru": "Кампания {id} «{name}»: {status}.",
            "en": "Campaign {id} {name!r}: {status}.",
        },
        "cli_deleted": {"ru": "Кампания {id} удалена.", "en": "Campaign {id} deleted."},
        "cli_warning": {"ru": "Внимание: {message}", "en": "Warning: {message}"},
        "cli_test_sent": {
            "ru": "Тестовое письмо отправлено на {email}: {answer}",
            "en": "Test email sent to {email}: {answer}",
        },
        "cli_import_progress": {"ru": "Импорт получателей", "en": "Importing recipients"},
        "cli_import_bulk_stdin": {
            "ru": "--bulk загружает файл: укажите путь, а не '-'.",
            "en": "--bulk uploads a file: give a path, not '-'.",
        },
        "cli_import_summary": {
            "ru": "Добавлено: {added}, дубликатов: {duplicates}, с ошибками: {invalid}.",
            "en": "Added: {added}, duplicates: {duplicates}, invalid: {invalid}.",
        },
        "cli_import_invalid": {
            "ru": "  строка {line}: «{email}» — {reason}",
            "en": "  line {line}: {email!r} — {reason}",
        },
        "cli_csv_no_email_column": {
            "ru": "В первой строке CSV нет столбца email (заголовок: email, name, переменные).",
            "en": "The CSV's first line has no email column (header: email, name, variables).",
        },
        "cli_csv_empty_email": {"ru": "пустой адрес", "en": "no address"},
        "cli_csv_extra_fields": {
            "ru": "полей больше, чем в заголовке",
            "en": "more fields than the header",
        },
        "cli_removed": {
            "ru": "Удалено: {removed}, не удалено: {kept}.",
            "en": "Removed: {removed}, not removed: {kept}.",
        },
        "cli_not_removed": {"ru": "  {email}: {reason}", "en": "  {email}: {reason}"},
        "cli_more": {
            "ru": "Есть ещё: --cursor {cursor}",
            "en": "There is more: --cursor {cursor}",
        },
        "cli_sending": {"ru": "Отправляется.", "en": "Sending."},
        "cli_waits_turn": {
            "ru": "Ждёт своей очереди.",
            "en": "Waits for its turn.",
        },
        "cli_until": {
            "ru": "Продолжим {when} (через {left}).",
            "en": "We go on {when} (in {left}).",
        },
        "cli_forecast": {
            "ru": "Прогноз завершения: {when}.",
            "en": "Expected to finish {when}.",
        },
        "cli_rate": {"ru": "{rate} писем/мин", "en": "{rate} emails/min"},
        "cli_progress": {
            "ru": "отправлено {sent} · ошибок {failed} · осталось {pending}",
            "en": "sent {sent} · failed {failed} · pending {pending}",
        },
        "cli_watch_done": {
            "ru": "Кампания {id} завершена: {status}. Отправлено {sent}, ошибок {failed}, "
            "отписано {unsubscribed}, под вопросом {in_doubt}.",
            "en": "Campaign {id} finished: {status}. Sent {sent}, failed {failed}, "
            "unsubscribed {unsubscribed}, in doubt {in_doubt}.",
        },
        "cli_watch_deleted": {
            "ru": "Кампания {id} удалена.",
            "en": "Campaign {id} was deleted.",
        },
        "cli_status_active": {
            "ru": "Активная кампания: {id} «{name}», {status} ({counts}).",
            "en": "Active campaign: {id} {name!r}, {status} ({counts}).",
        },
        "cli_status_none": {"ru": "Активной кампании нет.", "en": "No active campaign."},
        "cli_status_queue": {
            "ru": "В очереди ещё: {queued}, приостановлено: {paused}.",
            "en": "Also queued: {queued}, paused: {paused}.",
        },
        "cli_status_next": {
            "ru": "Следующая начнётся {when}.",
            "en": "The next one starts {when}.",
        },
        "cli_unsubscribed": {
            "ru": "{email}: отписан ({source}, {at}).",
            "en": "{email}: unsubscribed ({source}, {at}).",
        },
        "cli_subscribed": {"ru": "{email}: не отписан.", "en": "{email}: not unsubscribed."},
        "cli_unsubscribe_removed": {
            "ru": "{email}: отписка снята.",
            "en": "{email}: unsubscribe removed.",
        },
        "cli_unsubscribe_absent": {
            "ru": "{email}: отписки не было.",
            "en": "{email}: was not unsubscribed.",
        },
        "cli_requeued": {
            "ru": "Снова в очереди: {count}.",
            "en": "Queued again: {count}.",
        },
        "cli_resolved": {
            "ru": "Решено: {count} → {to}; кампания: {status}.",
            "en": "Resolved: {count} → {to}; campaign: {status}.",
        },
        "cli_suppressed": {
            "ru": "{email}: в списке подавления — {reason} ({source}, {at}).",
            "en": "{email}: suppressed — {reason} ({source}, {at}).",
        },
        "cli_not_suppressed": {
            "ru": "{email}: письма можно отправлять.",
            "en": "{email}: may be mailed.",
        },
        "cli_suppression_removed": {
            "ru": "{email}: удалён из списка подавления (было: {reason}).",
            "en": "{email}: removed from the suppression list (was: {reason}).",
        },
        "cli_suppression_absent": {
            "ru": "{email}: не было в списке подавления.",
            "en": "{email}: was not on the suppression list.",
        },
        "cli_quota": {
            "ru": "Квота: доступно {available} из {limit} в месяц; синхронизирована {synced}.",
            "en": "Quota: {available} of {limit} a month left; synced {synced}.",
        },
        "cli_quota_account": {
            "ru": (
                "Квота SMTP-аккаунта «{account}»: доступно {available} из {limit} в месяц; "
                "синхронизирована {synced}."
            ),
            "en": (
                "Quota of SMTP account “{account}”: {available} of {limit} a month left; "
                "synced {synced}."
            ),
        },
        "cli_limits_reloaded": {
            "ru": "Отложенных кампаний пересмотрено: {count}.",
            "en": "Deferrals decided again: {count}.",
        },
        "cli_quota_error": {
            "ru": "Последняя синхронизация не удалась: {error}",
            "en": "The last sync failed: {error}",
        },
        "cli_never": {"ru": "никогда", "en": "never"},
        "cli_no_instances": {
            "ru": "Ни один экземпляр mailer не ответил (префикс {prefix}).",
            "en": "No mailer instance answered (prefix {prefix}).",
        },
        "cli_unreachable": {
            "ru": "mailer недоступен: {message}",
            "en": "mailer is unreachable: {message}",
        },
        "cli_col_id": {"ru": "ID", "en": "ID"},
        "cli_col_name": {"ru": "Название", "en": "Name"},
        "cli_col_status": {"ru": "Статус", "en": "Status"},
        "cli_col_priority": {"ru": "Приоритет", "en": "Priority"},
        "cli_col_counts": {"ru": "Получатели", "en": "Recipients"},
        "cli_col_created": {"ru": "Создана", "en": "Created"},
        "cli_col_email": {"ru": "Адрес", "en": "Address"},
        "cli_col_error": {"ru": "Ошибка", "en": "Error"},
        "cli_col_at": {"ru": "Когда", "en": "When"},
        "cli_col_actor": {"ru": "Кто", "en": "Who"},
        "cli_col_action": {"ru": "Действие", "en": "Action"},
        "cli_col_details": {"ru": "Подробности", "en": "Details"},
        "cli_col_source": {"ru": "Источник", "en": "Source"},
        "cli_col_waits": {"ru": "Ждёт", "en": "Waits"},
        "cli_col_instance": {"ru": "Экземпляр", "en": "Instance"},
        "cli_col_version": {"ru": "Версия", "en": "Version"},
        "cli_col_prefix": {"ru": "Префикс", "en": "Prefix"},
        "cli_col_endpoints": {"ru": "Подписок", "en": "Endpoints"},
        "cli_col_rtt": {"ru": "Отклик, мс", "en": "RTT, ms"},
    }
)


class _TextFormatter(string.Formatter):
    """``str.format`` plus ``{n:plural:one|few|many}``: the word that goes with a
    number (Russian gives three forms, English two: ``{n:plural:one|many}``)."""

    def format_field(self, value: object, format_spec: str) -> str:
        if format_spec.startswith("plural:"):
            forms = tuple(format_spec.removeprefix("plural:").split("|"))
            lang: Lang = "ru" if len(forms) == 3 else "en"
            return _plural(int(str(value)), forms, lang)
        formatted: str = super().format_field(value, format_spec)
        return formatted


_FORMATTER = _TextFormatter()


def fields_of(code: str) -> set[str]:
    """The placeholders a text needs (those of its Russian form)."""
    template = TEXTS[code][DEFAULT_LANG] if code in TEXTS else ""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def text(code: str, lang: str | None = None, **values: object) -> str:
    variants = TEXTS.get(code)
    if variants is None:
        return code
    template = variants["en"] if lang == "en" else variants[DEFAULT_LANG]
    try:
        return _FORMATTER.format(template, **values)
    except (KeyError, IndexError, ValueError):
        return template


# ---------------------------------------------------------------------------------------
# Values worded from settings and from the calendar
# ---------------------------------------------------------------------------------------

# Zones people name by an abbreviation of their own; any other reads as its IANA name.
_TZ_LABELS: dict[str, dict[Lang, str]] = {
    "Europe/Moscow": {"ru": "МСК", "en": "MSK"},
    "UTC": {"ru": "UTC", "en": "UTC"},
    "Etc/UTC": {"ru": "UTC", "en": "UTC"},
}

_DAY_WORDS: dict[Lang, tuple[str, str]] = {
    "ru": ("сегодня", "завтра"),
    "en": ("today", "tomorrow"),
}

# "On <weekday>" in each language (Russian: the accusative after в/во).
_ON_WEEKDAY: dict[Lang, tuple[str, ...]] = {
    "ru": (
        "в понедельник",
        "во вторник",
        "в среду",
        "в четверг",
        "в пятницу",
        "в субботу",
        "в воскресенье",
    ),
    "en": (
        "on Monday",
        "on Tuesday",
        "on Wednesday",
        "on Thursday",
        "on Friday",
        "on Saturday",
        "on Sunday",
    ),
}

_RESUME: dict[Lang, tuple[str, str]] = {
    # (a day named by a word, a day named by weekday and date)
    "ru": ("{day} в {time} {tz}", "{day}, {date}, в {time} {tz}"),
    "en": ("{day} at {time} {tz}", "{day}, {date}, at {time} {tz}"),
}

# Units after "через N" / "in N": Russian (1, 2-4, 5+) forms, English (1, many).
_UNITS: dict[str, dict[Lang, tuple[str, ...]]] = {
    "hour": {"ru": ("час", "часа", "часов"), "en": ("hour", "hours")},
    "minute": {"ru": ("минуту", "минуты", "минут"), "en": ("minute", "minutes")},
    "second": {"ru": ("секунду", "секунды", "секунд"), "en": ("second", "seconds")},
}


def _lang(lang: str | None) -> Lang:
    return "en" if lang == "en" else DEFAULT_LANG


def tz_label(tz: tzinfo, lang: str | None = None) -> str:
    """How a time zone is named after a time: ``МСК`` / ``MSK`` for Moscow, else its name."""
    name = str(getattr(tz, "key", None) or tz)
    labels = _TZ_LABELS.get(name)
    return labels[_lang(lang)] if labels else name


def working_time(hhmm: str) -> str:
    """A configured ``HH:MM`` as people write it in a range: ``09:00`` -> ``9:00``."""
    hours, sep, minutes = hhmm.partition(":")
    if not sep or not hours.isdigit():
        return hhmm
    return f"{int(hours)}:{minutes}"


def resume_phrase(at: datetime, *, now: datetime, tz: tzinfo, lang: str | None = None) -> str:
    """When a deferral ends, as the manager reads it, relative to ``now`` in ``tz``.

    ``сегодня в 09:00 МСК`` / ``завтра в 09:00 МСК`` when it is today or the next
    calendar day there, else ``в понедельник, 30.11, в 09:00 МСК`` (a weekend or
    any other non-working day in between is never called "tomorrow").
    """
    lang = _lang(lang)
    local = at.astimezone(tz)
    days = (local.date() - now.astimezone(tz).date()).days
    values = {"time": local.strftime("%H:%M"), "tz": tz_label(tz, lang)}
    by_word, by_date = _RESUME[lang]
    if days <= 1:
        return by_word.format(day=_DAY_WORDS[lang][max(days, 0)], **values)
    return by_date.format(
        day=_ON_WEEKDAY[lang][local.weekday()], date=local.strftime("%d.%m"), **values
    )


_AT_TODAY: dict[Lang, str] = {"ru": "в {time}", "en": "at {time}"}


def at_phrase(at: datetime, *, now: datetime, tz: tzinfo, lang: str | None = None) -> str:
    """A time later today as ``в 14:00``; any other day with its day and zone
    (``resume_phrase``): a manager never reads a bare time that is not today."""
    lang = _lang(lang)
    if at.astimezone(tz).date() == now.astimezone(tz).date():
        return _AT_TODAY[lang].format(time=at.astimezone(tz).strftime("%H:%M"))
    return resume_phrase(at, now=now, tz=tz, lang=lang)


# A transient retry this much longer than any SMTP wait was moved to the next
# opening of working hours: "через 15 часов" would hide that, the time says it.
_LATER_SECONDS = 3600


# The reasons that belong to one SMTP account (its hour, quota or server).
ACCOUNT_REASONS = frozenset(
    {"rate_per_hour", "quota_exhausted", "transient_error", "circuit_breaker"}
)


def reason_key(code: str, *, until: datetime | None, now: datetime, account: str = "") -> str:
    """Which text words ``code`` for a wait until ``until``; ``account``: the SMTP
    account it waits for, named with several accounts ('': one account, not named)."""
    later = until is not None and (until - now).total_seconds() > _LATER_SECONDS
    key = "transient_error_later" if code == "transient_error" and later else code
    return f"{key}_account" if account and code in ACCOUNT_REASONS else key


def _plural(n: int, forms: tuple[str, ...], lang: Lang) -> str:
    if lang == "en":
        return forms[0] if n == 1 else forms[1]
    if n % 10 == 1 and n % 100 != 11:
        return forms[0]
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return forms[1]
    return forms[2]


def duration_phrase(minutes: float, lang: str | None = None) -> str:
    """A delay after "через" / "in": ``5 минут``, ``1 минуту``, ``2 hours``, ``90 секунд``.

    Whole hours and whole minutes read as such; anything else in seconds.
    """
    lang = _lang(lang)
    seconds = max(0, round(minutes * 60))
    if seconds >= 3600 and seconds % 3600 == 0:
        n, unit = seconds // 3600, "hour"
    elif seconds >= 60 and seconds % 60 == 0:
        n, unit = seconds // 60, "minute"
    else:
        n, unit = seconds, "second"
    return f"{n} {_plural(n, _UNITS[unit][lang], lang)}"


def reason_values(
    s: Settings,
    *,
    until: datetime | None,
    now: datetime,
    lang: str | None = None,
    account: str = "",
) -> dict[str, object]:
    """The placeholders of the reason texts, from settings and when the wait ends.

    ``until`` is the deferral's end (``now`` when there is none); the daily
    ``sent``/``limit`` are the caller's to add (they are the owner's, not the
    settings').
    """
    tz = ZoneInfo(s.timezone)
    end = until or now
    left = (end - now).total_seconds()
    # What is left of a wait, whole minutes rounded up ("через 5 минут", not
    # "через 297 секунд"); the configured delay when there is no wait to measure.
    retry_minutes = (
        (math.ceil(left / 60) if left >= 60 else left / 60)
        if left > 0
        else s.transient_retry_delay_minutes
    )
    limit = s.rate_per_hour
    if account:  # that account's own hourly limit (mailer.accounts)
        from mailer.accounts import accounts_of

        found = accounts_of(s).find(account)
        limit = found.rate_per_hour if found is not None else limit
    return {
        "account": account,
        "limit": limit,
        "time": end.astimezone(tz).strftime("%H:%M"),
        "at": at_phrase(end, now=now, tz=tz, lang=lang),
        "until": resume_phrase(end, now=now, tz=tz, lang=lang),
        "start": working_time(s.working_hours_start),
        "end": working_time(s.working_hours_end),
        "tz": tz_label(tz, lang),
        "retry_in": duration_phrase(retry_minutes, lang),
        "threshold": s.circuit_breaker_threshold,
    }
