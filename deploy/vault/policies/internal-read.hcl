# Internal service keys - READ: service accounts (the sidecars of internal services).
# Access matrix row "Internal Service Keys | Service Accounts | CI/CD System | Automated System".
#
# A sidecar reads the key record of each version it serves (data) and the version list
# with created/deletion times (metadata). Nothing else: no list, no write, no delete.
# Token lookup-self / renew-self come from Vault's "default" policy.
# One block pair per internal service; add a service = add its two paths.

path "secret/data/api_keys/risk_engine_service" {
  capabilities = ["read"]
}
path "secret/metadata/api_keys/risk_engine_service" {
  capabilities = ["read"]
}
