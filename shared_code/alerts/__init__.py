"""Azure Monitor alerts: Common Alert Schema models, normalisation, correlation and delivery."""
