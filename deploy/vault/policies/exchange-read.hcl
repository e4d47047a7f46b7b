# Exchange API keys - READ: trading systems (the authproxy sidecars of the trading engines).
# Access matrix row "Exchange API Keys | Trading Systems | DevOps + Security | Security Team".
#
# A sidecar reads the key record of each version it serves (data) and the version list
# with created/deletion times (metadata). Nothing else: no list, no write, no delete.
# Token lookup-self / renew-self come from Vault's "default" policy.
# One block pair per exchange service; add a service = add its two paths.

path "secret/data/api_keys/binance_spot_trading" {
  capabilities = ["read"]
}
path "secret/metadata/api_keys/binance_spot_trading" {
  capabilities = ["read"]
}
