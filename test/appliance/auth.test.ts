import Database from 'better-sqlite3';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { clientFrame, clientFrameHeader, rawWebSocket, REFUSED_AT_ACCEPT, writeAll, wrongProofAttempt, type RawWs } from '../support/attack-clients.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { makeVolume, ScriptedAgent, goodChunk, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { envelope, PROTOCOL_VERSION, type Hello } from '../../proto/messages.js';
import { ScramClient } from '../../proto/scram.js';
import { waitFor } from '../support/wait-for.js';

/**
 * Agent authentication against a real in-process appliance over real
 * WebSockets (DESIGN.md §4.2): SCRAM challenge–response, replay, legacy
 * credentials, `agents rotate`, and the pre-authentication bounds.
 * `agents rotate` runs the built CLI (npm run build).
 */
const CS = 4096;
const vol = (): TestVolume => makeVolume('pgdata', 8 * CS, CS);

describe('agent authentication', () => {
  const cleanup: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function appliance(opts: Parameters<typeof startAppliance>[1] = {}): Promise<ApplianceHarness> {
    const h = await startAppliance(['db1', 'db2'], opts);
    cleanup.push(() => h.close());
    return h;
  }

  async function connect(h: ApplianceHarness, localAddress?: string): Promise<ScriptedAgent> {
    const a = await ScriptedAgent.connect(h.url, undefined, { localAddress });
    cleanup.push(() => a.close());
    return a;
  }

  /** The whole exchange by hand: returns what an eavesdropper on ws:// would have captured. */
  async function manualLogin(a: ScriptedAgent, agent: string, token: string, v: TestVolume) {
    a.autoAuth = false;
    const scram = new ScramClient(agent, token, PROTOCOL_VERSION);
    const hello: Hello = {
      agent, clientNonce: scram.clientNonce, protocolVersion: PROTOCOL_VERSION, agentVersion: 'scripted', instanceId: a.instanceId,
      volumes: [{ name: v.name, size: v.size, chunkSize: v.chunkSize, lastImageId: '' }],
    };
    await a.send(envelope('hello', hello));
    const challenge = await a.next('authChallenge');
    const proof = await scram.proof(challenge);
    await a.send(envelope('authProof', proof));
    const welcome = await a.next('welcome');
    scram.checkWelcome(welcome);
    return { hello, challenge, proof };
  }

  it('a captured Hello and AuthProof replayed on a new connection are refused; the live session and its job go on', async () => {
    const h = await appliance();
    const v = vol();
    const a = await connect(h);
    const captured = await manualLogin(a, 'db1', h.tokens.db1!, v);
    // The secret never crossed the wire.
    for (const env of [envelope('hello', captured.hello), envelope('authProof', captured.proof)]) {
      expect(JSON.stringify(env)).not.toContain(h.tokens.db1!.slice(4));
    }
    const job = h.app.router.startJob('db1', 'pgdata', 'full');
    await a.next('runJob', job.id);
    await a.begin(job.id, v);
    await a.next('volumeReady', job.id);
    await a.batch(job.id, [0, 1, 2].map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);

    const attacker = await connect(h);
    attacker.autoAuth = false;
    await attacker.send(envelope('hello', captured.hello));
    const ch = await attacker.next('authChallenge');
    expect(Buffer.from(ch.serverNonce).equals(Buffer.from(captured.challenge.serverNonce))).toBe(false);
    await attacker.send(envelope('authProof', captured.proof));
    expect(await attacker.next('error')).toMatchObject({ code: 'E_AUTH' });
    expect((await attacker.closed).code).toBe(1008);

    // The honest session was not replaced: it finishes its job.
    await a.ping();
    expect(h.app.router.connectedAgents()).toEqual([expect.objectContaining({ agent: 'db1' })]);
    await a.batch(job.id, [3, 4, 5, 6, 7].map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);
    await a.end(job.id, 8, v);
    const committed = await a.next('committed', job.id);
    await a.result(job.id, true, committed.imageId);
    expect(await job.done).toMatchObject({ ok: true });
  });

  it('a wrong secret and an unknown name fail alike; an unknown name gets a challenge with a stable salt', async () => {
    const h = await appliance();
    for (const [agent, token] of [['db1', h.tokens.db2!], ['db9', h.tokens.db1!], ['db9', h.tokens.db1!]] as const) {
      const a = await connect(h);
      await a.sendHello(agent, token, [vol()]);
      const ch = await a.next('authChallenge');
      expect(ch.iterations).toBe(4096);
      expect(ch.salt.length).toBe(16);
      expect(await a.next('error')).toMatchObject({ code: 'E_AUTH', message: 'unknown agent or wrong token' });
      expect((await a.closed).code).toBe(1008);
    }
    const salts: string[] = [];
    for (let i = 0; i < 2; i++) {
      const a = await connect(h);
      a.autoAuth = false;
      await a.sendHello('ghost', 'x', [vol()]);
      salts.push(Buffer.from((await a.next('authChallenge')).salt).toString('hex'));
    }
    expect(salts[0]).toBe(salts[1]);
    expect(h.app.router.connectedAgents()).toEqual([]);
  });

  it('a credential stored before challenge-response (scrypt) is refused with E_AUTH telling the operator to rotate', async () => {
    const h = await appliance();
    const db = new Database(join(h.dataDir, 'catalog.sqlite'));
    db.prepare('UPDATE agents SET token_hash = ? WHERE name = ?').run('scrypt$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'db1');
    db.close();
    const a = await connect(h);
    await a.sendHello('db1', h.tokens.db1!, [vol()]);
    const err = await a.next('error');
    expect(err.code).toBe('E_AUTH');
    expect(err.message).toMatch(/agents rotate db1/);
    const token = h.app.catalog.rotateToken('db1');
    const b = await connect(h);
    await b.login('db1', token, [vol()]);
  });

  it('agents rotate ends the live session and its job at once; the old token no longer logs in, the new one does', async () => {
    const h = await appliance();
    const v = vol();
    const a = await connect(h);
    await a.login('db1', h.tokens.db1!, [v]);
    const job = h.app.router.startJob('db1', 'pgdata', 'full');
    await a.next('runJob', job.id);
    await a.begin(job.id, v);
    await a.next('volumeReady', job.id);

    const r = await applianceCmd(h.dataDir, ['agents', 'rotate', 'db1', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.json).toMatchObject({ agent: 'db1', sessionsEnded: 1 });
    expect((await a.closed).code).toBe(1008);
    expect(a.inbox).toContainEqual(envelope('error', { jobId: '', code: 'E_AUTH', message: 'the token of agent db1 was rotated' }));
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_CANCELLED' });
    // The socket's close reaches the router a moment after the client sees it.
    await waitFor('the rotated session to leave the router', () => h.app.router.connectedAgents().length === 0);

    const old = await connect(h);
    await old.sendHello('db1', h.tokens.db1!, [v]);
    expect(await old.next('error')).toMatchObject({ code: 'E_AUTH' });
    const fresh = await connect(h);
    await fresh.login('db1', r.json.token, [v]);
  });

  it('a rotate between challenge and proof fails the proof made with the old secret', async () => {
    const h = await appliance();
    const a = await connect(h);
    a.autoAuth = false;
    await a.sendHello('db1', h.tokens.db1!, [vol()]);
    const ch = await a.next('authChallenge');
    h.app.catalog.rotateToken('db1');
    await a.send(envelope('authProof', await a.scram!.proof(ch)));
    expect(await a.next('error')).toMatchObject({ code: 'E_AUTH' });
  });
});

describe('pre-authentication bounds', () => {
  const cleanup: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  async function raw(url: string, from: string): Promise<RawWs> {
    const ws = await rawWebSocket(url, from);
    cleanup.push(() => void ws.socket.destroy());
    return ws;
  }

  it('failed proofs from one source exhaust its bucket (429) without touching another source', async () => {
    const h = await startAppliance(['db1'], { authGuard: { failBurst: 3, failRefillMs: 60_000 } });
    cleanup.push(() => h.close());
    const outcomes = [];
    for (let i = 0; i < 5; i++) outcomes.push(await wrongProofAttempt(h.url, 'db1', '127.0.0.2'));
    expect(outcomes).toEqual(['closed', 'closed', 'closed', 'refused', 'refused']);
    const a = await ScriptedAgent.connect(h.url, undefined, { localAddress: '127.0.0.1' });
    cleanup.push(() => a.close());
    await a.login('db1', h.tokens.db1!, [vol()]);
    await a.ping();
  });

  it('any failure before authenticating counts against the source: 8 MiB frames before Hello exhaust its bucket too', async () => {
    const h = await startAppliance(['db1'], { authGuard: { failBurst: 2, failRefillMs: 60_000 } });
    cleanup.push(() => h.close());
    for (let i = 0; i < 2; i++) {
      const ws = await raw(h.url, '127.0.0.6');
      await writeAll(ws.socket, clientFrame(Buffer.alloc(1 << 20)));
      await ws.closed;
    }
    await expect(rawWebSocket(h.url, '127.0.0.6')).rejects.toThrow(/^HTTP\/1\.1 429 /);
    // A plain disconnect before Hello is not held against a source.
    for (let i = 0; i < 3; i++) {
      const ws = await raw(h.url, '127.0.0.7');
      ws.socket.destroy();
      await ws.closed;
    }
    await expect.poll(() => h.app.guard.authenticating).toBe(0);
    const a = await ScriptedAgent.connect(h.url, undefined, { localAddress: '127.0.0.7' });
    cleanup.push(() => a.close());
    await a.login('db1', h.tokens.db1!, [vol()]);
  });

  it('connections that have not authenticated are bounded per source and in total, from the TCP accept; an authenticated one does not count', async () => {
    const h = await startAppliance(['db1'], { authGuard: { maxPreAuthPerSource: 3, maxPreAuth: 5 } });
    cleanup.push(() => h.close());
    for (let i = 0; i < 2; i++) await raw(h.url, '127.0.0.3');
    // A TCP connection that never sends a byte of HTTP counts too.
    const silent = net.connect({ host: '127.0.0.1', port: Number(new URL(h.url).port), localAddress: '127.0.0.3' });
    cleanup.push(() => void silent.destroy());
    await new Promise((r) => silent.once('connect', r));
    await expect.poll(() => h.app.guard.authenticating).toBe(3);
    await expect(rawWebSocket(h.url, '127.0.0.3')).rejects.toThrow(REFUSED_AT_ACCEPT);
    const others = [await raw(h.url, '127.0.0.4'), await raw(h.url, '127.0.0.4')];
    expect(h.app.guard.authenticating).toBe(5);
    await expect(rawWebSocket(h.url, '127.0.0.1')).rejects.toThrow(REFUSED_AT_ACCEPT);
    for (const o of others) o.socket.destroy();
    await expect.poll(() => h.app.guard.authenticating).toBe(3);
    const a = await ScriptedAgent.connect(h.url, undefined, { localAddress: '127.0.0.1' });
    cleanup.push(() => a.close());
    await a.login('db1', h.tokens.db1!, [vol()]);
    expect(h.app.guard.authenticating).toBe(3);
  });

  it('over wss:// the authenticating slot is released at Welcome too (the TLS socket maps to its TCP connection)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bsn-auth-tls-'));
    cleanup.push(() => rm(dir, { recursive: true, force: true }));
    await execa('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', '/CN=blocksnap-test', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')]);
    const cert = await readFile(join(dir, 'cert.pem'));
    const h = await startAppliance(['db1'], { tls: { cert, key: await readFile(join(dir, 'key.pem')) } });
    cleanup.push(() => h.close());
    const a = await ScriptedAgent.connect(h.url, undefined, { ca: cert });
    cleanup.push(() => a.close());
    expect(h.app.guard.authenticating).toBe(1);
    await a.login('db1', h.tokens.db1!, [vol()]);
    expect(h.app.guard.authenticating).toBe(0);
  });

  it('a TCP connection that never completes its HTTP request is closed after the auth timeout', async () => {
    const h = await startAppliance(['db1'], { authTimeoutMs: 300 });
    cleanup.push(() => h.close());
    const silent = net.connect({ host: '127.0.0.1', port: Number(new URL(h.url).port), localAddress: '127.0.0.8' });
    cleanup.push(() => void silent.destroy());
    silent.on('error', () => undefined);
    await new Promise((r) => silent.once('connect', r));
    silent.write('GET /v1/agent HTTP/1.1\r\nHost: x\r\n'); // and never the rest
    const t0 = Date.now();
    await new Promise((r) => silent.once('close', r));
    expect(Date.now() - t0).toBeLessThan(5000);
    await expect.poll(() => h.app.guard.authenticating).toBe(0);
  });

  it('a job frame of 8 MiB before Hello is cut at the budget (64 KiB), never decoded, and its slot is released', async () => {
    const h = await startAppliance(['db1']);
    cleanup.push(() => h.close());
    const ws = await raw(h.url, '127.0.0.5');
    await writeAll(ws.socket, Buffer.concat([clientFrameHeader(8 << 20), Buffer.alloc(256 << 10)]));
    await ws.closed;
    expect(Buffer.concat(ws.received).readUInt16BE(2)).toBe(1009);
    await expect.poll(() => h.app.guard.authenticating).toBe(0);
    // A small frame that is not a Hello is refused as such.
    const ws2 = await raw(h.url, '127.0.0.5');
    const { encodeFrame } = await import('../../proto/codec.js');
    await writeAll(ws2.socket, clientFrame(encodeFrame(envelope('ping', { nonce: 1 }))));
    await ws2.closed;
    expect(Buffer.concat(ws2.received).toString()).toContain('expected hello, got ping');
  });
});
