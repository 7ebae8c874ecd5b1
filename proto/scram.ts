import { createHash, createHmac, pbkdf2, randomBytes, timingSafeEqual } from 'node:crypto';
import { BlocksnapError } from './errors.js';

/**
 * SCRAM-SHA-256-style agent authentication (DESIGN.md §4.2; ideas of RFC
 * 5802/7677, not their text encoding). The agent's secret (the token
 * `agents add` printed) never crosses the wire and the appliance never
 * stores it:
 *
 *   SaltedPassword = PBKDF2-HMAC-SHA256(secret, salt, iterations)
 *   ClientKey = HMAC(SaltedPassword, "Client Key")   StoredKey = SHA-256(ClientKey)
 *   ServerKey = HMAC(SaltedPassword, "Server Key")
 *   AuthMessage = the exchange (agent, both nonces, salt, iterations, protocol version)
 *   ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)
 *   ServerSignature = HMAC(ServerKey, AuthMessage)
 *
 * The appliance keeps salt, iterations, StoredKey and ServerKey. It checks a
 * proof by recovering ClientKey and hashing it (no key derivation on the
 * appliance: a flood of wrong proofs costs it two HMACs each). The server
 * nonce is fresh per connection, so a captured proof is useless for another
 * session. The agent checks ServerSignature, so a fake appliance (one without
 * the verifier) is detected too.
 */

export const SCRAM_PREFIX = 'scram-sha256';
/** PBKDF2 rounds for new verifiers. The secret is 256 random bits, so rounds only slow a guess that cannot succeed anyway. */
export const SCRAM_ITERATIONS = 4096;
/** Bounds the agent accepts in a challenge, so a fake appliance cannot make it spin. */
export const SCRAM_MIN_ITERATIONS = 4096;
export const SCRAM_MAX_ITERATIONS = 1_000_000;
export const NONCE_BYTES = 24;
export const MIN_NONCE_BYTES = 16;
export const MAX_NONCE_BYTES = 64;
export const SALT_BYTES = 16;
export const KEY_BYTES = 32;

export interface ScramVerifier {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

/** What both sides derive from the secret and the salt. */
export interface ScramKeys {
  clientKey: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

/** The parameters both sides bind the proof and the signature to. */
export interface ScramExchange {
  agent: string;
  clientNonce: Uint8Array;
  serverNonce: Uint8Array;
  salt: Uint8Array;
  iterations: number;
  protocolVersion: number;
}

const hmac = (key: Uint8Array, data: Uint8Array | string): Buffer => createHmac('sha256', key).update(data).digest();
const sha256 = (data: Uint8Array): Buffer => createHash('sha256').update(data).digest();

/** PBKDF2 on the libuv thread pool: never on the event loop. */
export function deriveKeys(secret: string, salt: Uint8Array, iterations: number): Promise<ScramKeys> {
  return new Promise((resolve, reject) => {
    pbkdf2(secret, salt, iterations, KEY_BYTES, 'sha256', (err, salted) => {
      if (err) return reject(new BlocksnapError('E_INTERNAL', 'PBKDF2 failed', { cause: err }));
      const clientKey = hmac(salted, 'Client Key');
      resolve({ clientKey, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') });
    });
  });
}

/** A new verifier for `secret` (what `agents add` / `agents rotate` store). */
export async function makeVerifier(secret: string, iterations = SCRAM_ITERATIONS): Promise<ScramVerifier> {
  const salt = randomBytes(SALT_BYTES);
  const k = await deriveKeys(secret, salt, iterations);
  return { iterations, salt, storedKey: k.storedKey, serverKey: k.serverKey };
}

/** `scram-sha256$<iterations>$<salt>$<StoredKey>$<ServerKey>` (base64url): self-describing, fits agents.token_hash. */
export function formatVerifier(v: ScramVerifier): string {
  const b = (x: Buffer) => x.toString('base64url');
  return `${SCRAM_PREFIX}$${v.iterations}$${b(v.salt)}$${b(v.storedKey)}$${b(v.serverKey)}`;
}

/**
 * The verifier in a stored string; undefined when it is not one (an older
 * format such as `scrypt$…`, or `disabled`).
 */
export function parseVerifier(stored: string): ScramVerifier | undefined {
  const p = stored.split('$');
  if (p.length !== 5 || p[0] !== SCRAM_PREFIX || !/^[0-9]{1,9}$/.test(p[1]!)) return undefined;
  const iterations = Number(p[1]);
  const [salt, storedKey, serverKey] = p.slice(2).map((x) => Buffer.from(x, 'base64url'));
  if (iterations < 1 || salt!.length < 8 || storedKey!.length !== KEY_BYTES || serverKey!.length !== KEY_BYTES) return undefined;
  return { iterations, salt: salt!, storedKey: storedKey!, serverKey: serverKey! };
}

/** The bytes both sides sign: every field length-prefixed, so no two exchanges encode alike. */
export function authMessage(x: ScramExchange): Buffer {
  const parts: Buffer[] = [Buffer.from('blocksnap-scram-sha256-v1')];
  for (const f of [Buffer.from(x.agent, 'utf8'), x.clientNonce, x.serverNonce, x.salt, Buffer.from(String(x.iterations)), Buffer.from(String(x.protocolVersion))]) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(f.length);
    parts.push(len, Buffer.from(f.buffer, f.byteOffset, f.byteLength));
  }
  return Buffer.concat(parts);
}

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}

/** Agent side: the proof for this exchange. */
export function clientProof(keys: ScramKeys, x: ScramExchange): Buffer {
  return xor(keys.clientKey, hmac(keys.storedKey, authMessage(x)));
}

/** Appliance side: does `proof` show knowledge of the secret behind `v` for this exchange? Constant time. */
export function verifyClientProof(v: ScramVerifier, x: ScramExchange, proof: Uint8Array): boolean {
  if (proof.length !== KEY_BYTES) return false;
  const clientKey = xor(Buffer.from(proof.buffer, proof.byteOffset, proof.byteLength), hmac(v.storedKey, authMessage(x)));
  return timingSafeEqual(sha256(clientKey), v.storedKey);
}

/** Appliance side: what it sends in Welcome to prove it holds the verifier. */
export function serverSignature(serverKey: Uint8Array, x: ScramExchange): Buffer {
  return hmac(serverKey, authMessage(x));
}

/** Agent side: is the appliance's signature right? Constant time. */
export function verifyServerSignature(keys: ScramKeys, x: ScramExchange, signature: Uint8Array): boolean {
  const want = serverSignature(keys.serverKey, x);
  return signature.length === want.length && timingSafeEqual(want, signature);
}

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

/**
 * The agent's half of the exchange, for one connection: its nonce (for
 * Hello), the proof for the appliance's challenge, the check of the
 * appliance's signature in Welcome. Challenge bounds are checked by
 * validateEnvelope (codec.ts) before `proof` is called.
 */
export class ScramClient {
  readonly clientNonce = newNonce();
  private exchange: ScramExchange | null = null;
  private keys: ScramKeys | null = null;

  constructor(
    private readonly agent: string,
    private readonly secret: string,
    private readonly protocolVersion: number,
    /** Derived keys by salt+iterations: a reconnect skips the PBKDF2. Shared between clients of one agent. */
    private readonly cache: Map<string, ScramKeys> = new Map(),
  ) {}

  async proof(ch: { salt: Uint8Array; iterations: number; serverNonce: Uint8Array }): Promise<{ clientProof: Buffer }> {
    if (this.exchange) throw new BlocksnapError('E_PROTOCOL', 'the appliance sent a second AuthChallenge');
    this.exchange = { agent: this.agent, clientNonce: this.clientNonce, serverNonce: ch.serverNonce, salt: ch.salt, iterations: ch.iterations, protocolVersion: this.protocolVersion };
    const key = `${Buffer.from(ch.salt).toString('base64')}/${ch.iterations}`;
    let keys = this.cache.get(key);
    if (!keys) {
      keys = await deriveKeys(this.secret, ch.salt, ch.iterations);
      this.cache.clear(); // one secret, one salt: keep only the current keys
      this.cache.set(key, keys);
    }
    this.keys = keys;
    return { clientProof: clientProof(keys, this.exchange) };
  }

  /** Throws E_AUTH unless the appliance proved it holds this agent's verifier. */
  checkWelcome(w: { serverSignature: Uint8Array }): void {
    if (!this.keys || !this.exchange) throw new BlocksnapError('E_AUTH', 'the appliance sent Welcome without a challenge: it did not authenticate this agent');
    if (!verifyServerSignature(this.keys, this.exchange, w.serverSignature)) {
      throw new BlocksnapError('E_AUTH', 'the appliance\'s signature is wrong: it does not hold this agent\'s verifier (a different appliance, or an impostor)');
    }
  }
}
