#!/usr/bin/env bash
# Makes the certificates dbmigrate's agents authenticate each other with, in
# the layout libvirt and QEMU use for migration TLS:
#
#   scripts/make-pki.sh CA_DIR OUT_DIR NAME [NAME ...]
#
# CA_DIR holds the certificate authority (ca-cert.pem, ca-key.pem); it is
# created when missing, and reused to sign every host. OUT_DIR receives one
# host's files: ca-cert.pem, server-cert.pem + server-key.pem (for `dbmigrate
# receive`) and client-cert.pem + client-key.pem (for `dbmigrate migrate`),
# both valid for every NAME (DNS names or IP addresses; the first is also the
# common name). Copy OUT_DIR to the host as /etc/pki/dbmigrate (mode 0700).
#
# This is a small private CA for tests and trials; an operator who already
# runs a CA for libvirt or QEMU migration TLS can use its files as they are.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 CA_DIR OUT_DIR NAME [NAME ...]" >&2
  exit 2
fi
ca=$1 out=$2
shift 2
cn=$1
command -v openssl >/dev/null || { echo "make-pki.sh: openssl is missing (apt-get install openssl)" >&2; exit 1; }
umask 077
mkdir -p "$ca" "$out"
days=3650
if [ ! -s "$ca/ca-cert.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$ca/ca-key.pem" -out "$ca/ca-cert.pem" -days "$days" \
    -subj "/CN=dbmigrate CA $(basename "$(cd "$ca" && pwd)")" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
san=""
for n in "$@"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}
issue() { # role: server or client
  local role=$1 usage=$2 tmp
  tmp=$(mktemp -d)
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/$role-key.pem" -out "$tmp/req.pem" -subj "/CN=$cn" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$usage" "$san" >"$tmp/ext"
  openssl x509 -req -in "$tmp/req.pem" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
    -CAcreateserial -out "$out/$role-cert.pem" -days "$days" -extfile "$tmp/ext" 2>/dev/null
  rm -rf "$tmp"
}
issue server serverAuth
issue client clientAuth
cp "$ca/ca-cert.pem" "$out/ca-cert.pem"
chmod 0700 "$out"
echo "make-pki.sh: $out holds certificates for ${san//,/ } signed by $ca" >&2
