// An application's Node backend with jose: one fresh key pair per algorithm (EdDSA, ES256, RS256), the public
// halves as a JWKS document (jose's exportJWK, plus kid, alg and use), and a token per key for mailbox
// "jose-<alg>". Prints {"jwks": ..., "tokens": {alg: token}} as one JSON line (tests/client_js/test_issuer_examples.py).
import { SignJWT, exportJWK, generateKeyPair } from 'jose'

const keys = []
const tokens = {}
for (const alg of ['EdDSA', 'ES256', 'RS256']) {
  const { publicKey, privateKey } = await generateKeyPair(alg, alg === 'EdDSA' ? { crv: 'Ed25519' } : {})
  const kid = `jose-${alg.toLowerCase()}`
  keys.push({ ...(await exportJWK(publicKey)), kid, alg, use: 'sig' })
  tokens[alg] = await new SignJWT({})
    .setProtectedHeader({ alg, kid })
    .setSubject(kid)
    .setAudience('relay')
    .setIssuedAt()
    .setExpirationTime('10m')
    .sign(privateKey)
}
console.log(JSON.stringify({ jwks: { keys }, tokens }))
