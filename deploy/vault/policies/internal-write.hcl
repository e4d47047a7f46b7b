# Internal service keys - WRITE: the CI/CD system (provisioning).
#
# "create" on a KV v2 data path is granted only while the secret does not exist yet
# (Vault's existence check): a writer provisions a service's first key, but cannot write
# a new version over an existing key - that is a rotation (internal-rotate.hcl).
# Metadata read shows what exists (versions, times; no secret). No read of key material.

path "secret/data/api_keys/risk_engine_service" {
  capabilities = ["create"]
}
path "secret/metadata/api_keys/risk_engine_service" {
  capabilities = ["read"]
}
