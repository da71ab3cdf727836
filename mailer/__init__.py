"""mailer: the email-campaign engine of the CRM."""

__version__ = "0.1.0"
