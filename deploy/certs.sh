#!/usr/bin/env bash
# TLS material for a SuperLink and SuperNode authentication keys, for Flower 1.42.
#
#   bash deploy/certs.sh [-n SUPERNODES] OUTDIR [SERVER_NAME_OR_IP ...]
#
# OUTDIR/ca.crt, ca.key         a private CA (give ca.crt to every SuperNode and `flwr` user: --root-certificates)
# OUTDIR/server.pem, server.key  the SuperLink's certificate, valid for localhost, 127.0.0.1, ::1 and every extra
#                                name/IP given (the address SuperNodes, `flwr` and the SuperExec dial must be one)
# OUTDIR/supernode-<i>[.pub]     P-384 ECDSA key pairs in OpenSSH format, i = 0..SUPERNODES-1 (default 3): the
#                                private key goes to `flower-supernode --auth-supernode-private-key`, the .pub to
#                                `flwr supernode register`
# Existing files are overwritten.
set -euo pipefail

n=3
while getopts "n:" opt; do
  case "$opt" in
    n) n="$OPTARG" ;;
    *) echo "usage: $0 [-n SUPERNODES] OUTDIR [SERVER_NAME_OR_IP ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-n SUPERNODES] OUTDIR [SERVER_NAME_OR_IP ...]" >&2; exit 2; }
out="$1"; shift
mkdir -p "$out"
cd "$out"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done

# Key identifiers and key usages: strict X.509 verification (Python >= 3.13, OpenSSL 3) rejects certificates
# without them.
openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=LoRM-Flower CA" \
  -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" 2>/dev/null

openssl req -newkey rsa:3072 -nodes -subj "/CN=superlink" -keyout server.key -out server.csr 2>/dev/null
cat > server.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$sans
EOF
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl

for ((i = 0; i < n; i++)); do
  rm -f "supernode-$i" "supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "supernode-$i"
done
chmod 600 ca.key server.key supernode-*[0-9]
echo "wrote CA, server certificate ($sans) and $n SuperNode key pairs to $(pwd)"
