# Exchange API keys - ROTATE: Security Team.
#
# A rotation writes a new version of an existing key ("update", with check-and-set:
# metadata read gives the current version) and revokes old or compromised versions
# (soft delete, undelete, destroy). Still no read of key material: rotating a key does
# not require seeing it.

path "secret/data/api_keys/binance_spot_trading" {
  capabilities = ["update"]
}
path "secret/metadata/api_keys/binance_spot_trading" {
  capabilities = ["read"]
}
path "secret/delete/api_keys/binance_spot_trading" {
  capabilities = ["update"]
}
path "secret/undelete/api_keys/binance_spot_trading" {
  capabilities = ["update"]
}
path "secret/destroy/api_keys/binance_spot_trading" {
  capabilities = ["update"]
}
