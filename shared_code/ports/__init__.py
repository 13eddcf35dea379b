"""Small Protocols per capability: what a product, a store or a map source offers the services."""
