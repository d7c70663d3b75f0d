"""Provisioning of gateways and enrollment of tenants (central-office side tools)."""
