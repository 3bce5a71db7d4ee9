#!/usr/bin/env bash
# Make a CA and a SuperLink certificate for TLS: SANs DNS:superlink (compose), DNS:localhost,
# IP:127.0.0.1 (local processes). Usage: scripts/make_certs.sh OUT_DIR   (needs openssl)
set -euo pipefail
out="${1:-certificates}"
mkdir -p "$out"
cd "$out"
[ -f ca.crt ] && [ -f server.pem ] && exit 0
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -sha256 -days 365 -subj "/CN=fedpsg-ca" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
echo "wrote $(pwd)/{ca.crt,server.pem,server.key}"
