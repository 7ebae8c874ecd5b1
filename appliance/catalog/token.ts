import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';
import { formatVerifier, KEY_BYTES, parseVerifier, SALT_BYTES, SCRAM_ITERATIONS, type ScramVerifier } from '../../proto/scram.js';

/**
 * Agent credentials. The token is shown once (`agents add` / `agents
 * rotate`); the catalog keeps only a SCRAM verifier (proto/scram.ts) in
 * agents.token_hash, so a stolen catalog neither reveals the token nor lets
 * anyone pose as an agent, and the token never crosses the wire.
 */

export function newToken(): string {
  return 'bsn_' + randomBytes(32).toString('base64url');
}

/** The stored form of `token`: `scram-sha256$iter$salt$StoredKey$ServerKey` (sync: CLI and tests only). */
export function hashToken(token: string, iterations = SCRAM_ITERATIONS): string {
  const salt = randomBytes(SALT_BYTES);
  const salted = pbkdf2Sync(token, salt, iterations, KEY_BYTES, 'sha256');
  const clientKey = createHmac('sha256', salted).update('Client Key').digest();
  return formatVerifier({
    iterations, salt,
    storedKey: createHash('sha256').update(clientKey).digest(),
    serverKey: createHmac('sha256', salted).update('Server Key').digest(),
  });
}

/**
 * What a stored credential allows: a SCRAM verifier; `legacy` for the
 * `scrypt$…` hashes of earlier versions, which cannot answer a challenge
 * (the operator must `agents rotate` the agent); `none` for anything else
 * (`disabled` rows made by `catalog rebuild`).
 */
export type Credential = { kind: 'scram'; verifier: ScramVerifier } | { kind: 'legacy' } | { kind: 'none' };

export function credentialOf(stored: string): Credential {
  const verifier = parseVerifier(stored);
  if (verifier) return { kind: 'scram', verifier };
  return stored.startsWith('scrypt$') ? { kind: 'legacy' } : { kind: 'none' };
}

/** Does `token` match the stored verifier? Sync key derivation: for the CLI and tests, never the server's event loop. */
export function tokenMatches(token: string, stored: string): boolean {
  const c = credentialOf(stored);
  if (c.kind !== 'scram') return false;
  const salted = pbkdf2Sync(token, c.verifier.salt, c.verifier.iterations, KEY_BYTES, 'sha256');
  const storedKey = createHash('sha256').update(createHmac('sha256', salted).update('Client Key').digest()).digest();
  return timingSafeEqual(storedKey, c.verifier.storedKey);
}
