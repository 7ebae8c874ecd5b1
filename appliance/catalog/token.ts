import { randomBytes, scryptSync, timingSafeEqual } from 'node:crypto';

/**
 * Agent credentials. The token is shown once (`agents add`); the catalog
 * keeps only `scrypt$<salt>$<hash>`, so a stolen catalog does not let anyone
 * pose as an agent.
 */
const KEYLEN = 32;
const PARAMS = { N: 16384, r: 8, p: 1 } as const;

export function newToken(): string {
  return 'bsn_' + randomBytes(32).toString('base64url');
}

export function hashToken(token: string): string {
  const salt = randomBytes(16);
  const hash = scryptSync(token, salt, KEYLEN, PARAMS);
  return `scrypt$${salt.toString('base64url')}$${hash.toString('base64url')}`;
}

export function verifyToken(token: string, stored: string): boolean {
  const parts = stored.split('$');
  if (parts.length !== 3 || parts[0] !== 'scrypt') return false;
  const salt = Buffer.from(parts[1]!, 'base64url');
  const want = Buffer.from(parts[2]!, 'base64url');
  const got = scryptSync(token, salt, KEYLEN, PARAMS);
  return got.length === want.length && timingSafeEqual(got, want);
}
