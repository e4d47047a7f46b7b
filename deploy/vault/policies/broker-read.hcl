# Broker API keys - READ: risk management (the authproxy sidecars of the risk systems).
# Access matrix row "Broker API Keys | Risk Management | DevOps + Security | Security Team".
#
# A sidecar reads the key record of each version it serves (data) and the version list
# with created/deletion times (metadata). Nothing else: no list, no write, no delete.
# Token lookup-self / renew-self come from Vault's "default" policy.
# One block pair per broker service; add a service = add its two paths.

path "secret/data/api_keys/interactive_brokers" {
  capabilities = ["read"]
}
path "secret/metadata/api_keys/interactive_brokers" {
  capabilities = ["read"]
}
