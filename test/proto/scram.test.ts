import { describe, expect, it } from 'vitest';
import { credentialOf, hashToken, newToken, tokenMatches } from '../../appliance/catalog/token.js';
import {
  clientProof, deriveKeys, formatVerifier, makeVerifier, newNonce, parseVerifier, ScramClient, serverSignature, verifyClientProof,
  type ScramExchange, type ScramVerifier,
} from '../../proto/scram.js';

const code = (c: string) => expect.objectContaining({ code: c });

/** The appliance's half, as agent-session.ts runs it: a challenge from the verifier, then the proof check. */
function challenge(v: ScramVerifier, agent: string, clientNonce: Uint8Array): ScramExchange {
  return { agent, clientNonce, serverNonce: newNonce(), salt: v.salt, iterations: v.iterations, protocolVersion: 2 };
}

describe('SCRAM exchange (proto/scram.ts)', () => {
  it('the right secret gives a proof the verifier accepts, and the appliance signature the agent accepts', async () => {
    const token = newToken();
    const v = parseVerifier(hashToken(token))!;
    const client = new ScramClient('db1', token, 2);
    const x = challenge(v, 'db1', client.clientNonce);
    const { clientProof: proof } = await client.proof(x);
    expect(verifyClientProof(v, x, proof)).toBe(true);
    expect(() => client.checkWelcome({ serverSignature: serverSignature(v.serverKey, x) })).not.toThrow();
  });

  it('a captured proof is useless against a new server nonce (replay)', async () => {
    const token = newToken();
    const v = parseVerifier(hashToken(token))!;
    const client = new ScramClient('db1', token, 2);
    const first = challenge(v, 'db1', client.clientNonce);
    const { clientProof: captured } = await client.proof(first);
    expect(verifyClientProof(v, first, captured)).toBe(true);
    // The attacker replays Hello (same client nonce) and the proof; the appliance's nonce is new.
    const replay = challenge(v, 'db1', client.clientNonce);
    expect(verifyClientProof(v, replay, captured)).toBe(false);
  });

  it('a wrong secret, another agent name or a flipped bit fails', async () => {
    const token = newToken();
    const v = parseVerifier(hashToken(token))!;
    const wrong = new ScramClient('db1', newToken(), 2);
    const x = challenge(v, 'db1', wrong.clientNonce);
    expect(verifyClientProof(v, x, (await wrong.proof(x)).clientProof)).toBe(false);

    const right = new ScramClient('db1', token, 2);
    const y = challenge(v, 'db1', right.clientNonce);
    const proof = (await right.proof(y)).clientProof;
    expect(verifyClientProof(v, { ...y, agent: 'db2' }, proof)).toBe(false);
    const flipped = Buffer.from(proof);
    flipped[0]! ^= 1;
    expect(verifyClientProof(v, y, flipped)).toBe(false);
    expect(verifyClientProof(v, y, proof.subarray(0, 31))).toBe(false);
  });

  it('the agent refuses a Welcome whose signature does not come from its verifier (a fake appliance)', async () => {
    const token = newToken();
    const real = parseVerifier(hashToken(token))!;
    const client = new ScramClient('db1', token, 2);
    const x = challenge(real, 'db1', client.clientNonce);
    await client.proof(x);
    // An impostor knows salt and iterations (they are public) but not ServerKey.
    const fake = await makeVerifier(newToken());
    expect(() => client.checkWelcome({ serverSignature: serverSignature(fake.serverKey, x) })).toThrow(code('E_AUTH'));
    expect(() => client.checkWelcome({ serverSignature: Buffer.alloc(32) })).toThrow(code('E_AUTH'));
    // Welcome with no challenge before it: the appliance never checked this agent.
    expect(() => new ScramClient('db1', token, 2).checkWelcome({ serverSignature: Buffer.alloc(32) })).toThrow(code('E_AUTH'));
  });

  it('the stored verifier holds no secret and is self-describing; old scrypt hashes are recognised as legacy', async () => {
    const token = newToken();
    const stored = hashToken(token);
    expect(stored).toMatch(/^scram-sha256\$4096\$[A-Za-z0-9_-]+\$[A-Za-z0-9_-]{43}\$[A-Za-z0-9_-]{43}$/);
    expect(stored).not.toContain(token.slice(4));
    const v = parseVerifier(stored)!;
    expect(formatVerifier(v)).toBe(stored);
    // Async derivation (the agent's) and the sync one (token.ts) agree.
    const k = await deriveKeys(token, v.salt, v.iterations);
    expect(k.storedKey.equals(v.storedKey) && k.serverKey.equals(v.serverKey)).toBe(true);
    expect(tokenMatches(token, stored)).toBe(true);
    expect(tokenMatches(newToken(), stored)).toBe(false);
    expect(credentialOf(stored).kind).toBe('scram');
    expect(credentialOf('scrypt$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA').kind).toBe('legacy');
    expect(credentialOf('disabled').kind).toBe('none');
    expect(parseVerifier('scram-sha256$4096$AA$AA$AA')).toBeUndefined();
  });

  it('the proof binds every exchange field', async () => {
    const token = newToken();
    const v = parseVerifier(hashToken(token))!;
    const client = new ScramClient('db1', token, 2);
    const x = challenge(v, 'db1', client.clientNonce);
    const proof = clientProof(await deriveKeys(token, v.salt, v.iterations), x);
    expect(verifyClientProof(v, x, proof)).toBe(true);
    for (const change of [{ clientNonce: newNonce() }, { serverNonce: newNonce() }, { iterations: 4097 }, { protocolVersion: 1 }, { salt: Buffer.alloc(16) }]) {
      expect(verifyClientProof(v, { ...x, ...change }, proof)).toBe(false);
    }
  });
});
