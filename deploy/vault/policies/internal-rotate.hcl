# Internal service keys - ROTATE: the automated rotation system (authproxy keys rotate).
#
# A rotation writes a new version of an existing key ("update", with check-and-set:
# metadata read gives the current version) and revokes old or compromised versions
# (soft delete, undelete, destroy). Still no read of key material: rotating a key does
# not require seeing it.

path "secret/data/api_keys/risk_engine_service" {
  capabilities = ["update"]
}
path "secret/metadata/api_keys/risk_engine_service" {
  capabilities = ["read"]
}
path "secret/delete/api_keys/risk_engine_service" {
  capabilities = ["update"]
}
path "secret/undelete/api_keys/risk_engine_service" {
  capabilities = ["update"]
}
path "secret/destroy/api_keys/risk_engine_service" {
  capabilities = ["update"]
}
