"""keyhygiene: keeps an organisation's OpenRouter API keys clean, unattended."""
