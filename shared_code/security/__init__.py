"""Who may call the app: validation of Entra ID tokens presented to the HTTP triggers."""
