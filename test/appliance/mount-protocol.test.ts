/**
 * The instant-mount messages (DESIGN.md §4.5) against a real in-process
 * appliance, with scripted agents: grants (and the export really served over
 * NBD to the granted address, checked with nbdcopy), who may mount what,
 * WalFetch (pieces, digests, refusals), releases both ways, the
 * appliance-triggered RunMount, and malformed mount frames.
 */
import { execa } from 'execa';
import { createHash } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chunkCountOf, goodChunk, makeVolume, nonZeroIndexes, ScriptedAgent } from '../../appliance/testing/scripted-agent.js';
import { envelope, JobMode, type WalPiece } from '../../proto/messages.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { backupPgImage, MOUNT_WAL_BYTES, MOUNT_WAL_NAME } from '../support/mount-images.js';

const WAL_NAME = MOUNT_WAL_NAME;
const WAL_BYTES = MOUNT_WAL_BYTES;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();
const backupPg = backupPgImage;

/** Every WalPiece of `mountId` until the file is whole; checks each digest like the agent does. */
async function fetchWal(a: ScriptedAgent, mountId: string, name: string): Promise<Buffer> {
  await a.send(envelope('walFetch', { mountId, name }));
  const parts: WalPiece[] = [];
  let have = 0;
  for (;;) {
    const p = await a.next('walPiece', mountId, 15_000);
    const plain = zstdDecompress(p.data, p.plainLength);
    expect(sha(plain).equals(p.digest)).toBe(true);
    parts.push({ ...p, data: plain });
    have += p.plainLength;
    if (have >= p.fileSize) break;
  }
  const out = Buffer.alloc(parts[0]!.fileSize);
  for (const p of parts) Buffer.from(p.data).copy(out, p.offset);
  return out;
}

/** The next MountGranted (it carries a request id, not a job id), which must answer `id`. */
async function granted(a: ScriptedAgent, id: string) {
  const g = await a.next('mountGranted', undefined, 10_000);
  expect(g.requestId).toBe(id);
  return g;
}

describe('mount protocol', () => {
  let h: ApplianceHarness;
  let db1: ScriptedAgent;
  let db2: ScriptedAgent;
  const v1 = makeVolume('pgdata', 12 * 65536 + 4096, 65536, [3, 4]);
  const v2 = makeVolume('other', 4 * 65536, 65536);
  let img1: string;
  let img2: string;
  let rq = 0;
  const requestId = () => `mrq-test-${++rq}`;

  beforeAll(async () => {
    h = await startAppliance(['db1', 'db2', 'db3']);
    db1 = await ScriptedAgent.connect(h.url);
    await db1.login('db1', h.tokens.db1!, [v1]);
    db2 = await ScriptedAgent.connect(h.url);
    await db2.login('db2', h.tokens.db2!, [v2]);
    img1 = await backupPg(db1, h, 'db1', v1);
    const job = h.app.router.startJob('db2', 'other', 'full');
    await db2.next('runJob', job.id);
    img2 = (await db2.transfer(job.id, v2)).committed.imageId;
  }, 60_000);
  afterAll(async () => {
    await db1?.close();
    await db2?.close();
    await h?.close();
  });

  it('grants an agent its own image: one secret export per volume with the PostgreSQL part, served over NBD to that address only', async () => {
    const id = requestId();
    await db1.send(envelope('mountRequest', { requestId: id, imageId: img1, writable: true, ttlSeconds: 600 }));
    const g = await granted(db1, id);
    expect(g).toMatchObject({ imageId: img1, writable: true, nbdPort: h.app.nbdPort, tls: false });
    expect(g.exports).toHaveLength(1);
    const x = g.exports[0]!;
    expect(x).toMatchObject({ volume: 'pgdata', imageId: img1, size: v1.size, chunkSize: 65536 });
    expect(x.exportName).toMatch(/^[0-9a-f]{32}$/);
    expect(x.pg).toMatchObject({ stopLsn: '0/3000138', timeline: 1, serverVersion: 150010, role: 'primary', wal: [WAL_NAME] });
    expect(x.pg!.labelFile).toContain('CHECKPOINT LOCATION');
    expect(h.app.mounts.isMounted(img1)).toBe(true);
    // The real NBD server serves the export to 127.0.0.1 (where the agent connected from), byte-identical to the volume.
    const out = join(h.dataDir, 'copy.raw');
    await execa('nbdcopy', [`nbd://127.0.0.1:${g.nbdPort}/${x.exportName}`, out], { timeout: 30_000 });
    expect((await readFile(out)).equals(v1.data)).toBe(true);
    await rm(out);
    // A mount handed to another address is not served to this one (nbdinfo connects from 127.0.0.1).
    const elsewhere = await h.app.mounts.create({
      imageRef: img1, agent: h.app.catalog.agent('db1')!, peerAddress: '127.0.0.9', writable: false, ttlSeconds: 0, requestedBy: 'agent',
    });
    const other = await execa('nbdinfo', [`nbd://127.0.0.1:${g.nbdPort}/${elsewhere.exports[0]!.exportName}`], { timeout: 20_000, reject: false });
    expect(other.exitCode).not.toBe(0);
    await h.app.mounts.remove(elsewhere.id, 'test done');
    await db1.send(envelope('mountRelease', { mountId: g.mountId, reason: 'test done' }));
    await expect.poll(() => h.app.mounts.mounts.get(g.mountId)?.state, { timeout: 10_000 }).toBe('ended');
    expect(h.app.mounts.isMounted(img1)).toBe(false);
    const gone = await execa('nbdinfo', [`nbd://127.0.0.1:${g.nbdPort}/${x.exportName}`], { timeout: 20_000, reject: false });
    expect(gone.exitCode).not.toBe(0);
  }, 60_000);

  it('refuses another agent\'s image and an unknown one alike (E_NOT_FOUND), and releases of mounts that are not the agent\'s', async () => {
    for (const imageId of [img1, 'img-does-not-exist']) {
      const id = requestId();
      await db2.send(envelope('mountRequest', { requestId: id, imageId, writable: false, ttlSeconds: 0 }));
      expect(await db2.next('error', id)).toMatchObject({ code: 'E_NOT_FOUND' });
    }
    const id = requestId();
    await db1.send(envelope('mountRequest', { requestId: id, imageId: img1, writable: false, ttlSeconds: 0 }));
    const g = await granted(db1, id);
    await db2.send(envelope('mountRelease', { mountId: g.mountId, reason: '' }));
    expect(await db2.next('error', g.mountId)).toMatchObject({ code: 'E_NOT_FOUND' });
    expect(h.app.mounts.mounts.get(g.mountId)?.state).toBe('active');
    await db1.send(envelope('mountRelease', { mountId: g.mountId, reason: '' }));
    await expect.poll(() => h.app.mounts.mounts.get(g.mountId)?.state, { timeout: 10_000 }).toBe('ended');
    await db1.ping();
    await db2.ping();
  });

  it('WalFetch sends a segment the image needs in digest-checked pieces; refuses other names, ended mounts and other agents', async () => {
    const id = requestId();
    await db1.send(envelope('mountRequest', { requestId: id, imageId: img1, writable: true, ttlSeconds: 0 }));
    const g = await granted(db1, id);
    expect((await fetchWal(db1, g.mountId, WAL_NAME)).equals(WAL_BYTES)).toBe(true);
    await db1.send(envelope('walFetch', { mountId: g.mountId, name: '000000010000000000000004' }));
    expect(await db1.next('error', g.mountId)).toMatchObject({ code: 'E_NOT_FOUND' });
    await db2.send(envelope('walFetch', { mountId: g.mountId, name: WAL_NAME }));
    expect(await db2.next('error', g.mountId)).toMatchObject({ code: 'E_NOT_FOUND' });
    expect(db2.inbox.filter((e) => e.kind === 'walPiece')).toEqual([]);
    // The operator removes the mount: the agent is told (MountRelease), and its WAL is no longer served.
    await h.app.mounts.remove(g.mountId, 'removed by operator');
    let rel = await db1.next('mountRelease');
    while (rel.mountId !== g.mountId) rel = await db1.next('mountRelease'); // earlier tests' removals come first
    expect(rel).toMatchObject({ mountId: g.mountId, reason: 'removed by operator' });
    await db1.send(envelope('walFetch', { mountId: g.mountId, name: WAL_NAME }));
    expect(await db1.next('error', g.mountId)).toMatchObject({ code: 'E_NOT_FOUND' });
  }, 60_000);

  it('RunMount: the operator lets an agent mount another agent\'s image, only under that request id, and gets its MountResult', async () => {
    const { requestId: rid, result } = h.app.mountProtocol.runMount('db2', { imageId: img1, pgPort: 5499, target: '/srv/copy', asStandby: false, writable: true });
    const run = await db2.next('runMount');
    expect(run).toMatchObject({ requestId: rid, imageId: img1, pgPort: 5499, target: '/srv/copy', asStandby: false, writable: true });
    // The same image under another request id is still refused.
    const other = requestId();
    await db2.send(envelope('mountRequest', { requestId: other, imageId: img1, writable: true, ttlSeconds: 0 }));
    expect(await db2.next('error', other)).toMatchObject({ code: 'E_NOT_FOUND' });
    await db2.send(envelope('mountRequest', { requestId: rid, imageId: img1, writable: true, ttlSeconds: 0 }));
    const g = await granted(db2, rid);
    expect(h.app.mounts.mounts.get(g.mountId)).toMatchObject({ agent: 'db2', requestedBy: 'operator', imageRef: img1 });
    await db2.send(envelope('mountResult', {
      requestId: rid, ok: true, errorCode: '', errorMessage: '', mountId: g.mountId, connection: 'host=/tmp port=5499',
      secondsToFirstQuery: 0.9, target: '/srv/copy', pgPort: 5499,
    }));
    expect(await result).toMatchObject({ ok: true, mountId: g.mountId, connection: 'host=/tmp port=5499', secondsToFirstQuery: 0.9 });
    // A result for a request that is not (any longer) pending is refused.
    await db2.send(envelope('mountResult', { requestId: rid, ok: false, errorCode: 'E_PG', errorMessage: 'x', mountId: '', connection: '', secondsToFirstQuery: 0, target: '', pgPort: 0 }));
    expect(await db2.next('error', rid)).toMatchObject({ code: 'E_NOT_FOUND' });
    // Unknown agent or image: refused before anything is sent.
    expect(() => h.app.mountProtocol.runMount('nobody', { imageId: img1, pgPort: 0, target: '', asStandby: false, writable: true })).toThrow(/not connected/);
    expect(() => h.app.mountProtocol.runMount('db2', { imageId: 'img-nope', pgPort: 0, target: '', asStandby: false, writable: true })).toThrow(/no image/);
    await h.app.mounts.remove(g.mountId, 'test done');
    expect(h.app.mounts.isMounted(img2)).toBe(false);
  }, 60_000);

  it('a reconnect of the same agent process keeps its mounts; a new process of the agent ends them (it released them at its start)', async () => {
    const id = requestId();
    await db2.send(envelope('mountRequest', { requestId: id, imageId: img2, writable: true, ttlSeconds: 0 }));
    const g = await granted(db2, id);
    // The same process (instance id) reconnects: the mount stays.
    await db2.close();
    db2 = await ScriptedAgent.connect(h.url, db2.instanceId);
    await db2.login('db2', h.tokens.db2!, [v2]);
    await db2.ping();
    expect(h.app.mounts.mounts.get(g.mountId)?.state).toBe('active');
    // A new process of db2: what the old one mounted is gone (LocalMounter.cleanupOrphans at its start).
    await db2.close();
    db2 = await ScriptedAgent.connect(h.url);
    await db2.login('db2', h.tokens.db2!, [v2]);
    await expect.poll(() => h.app.mounts.mounts.get(g.mountId)?.state, { timeout: 10_000 }).toBe('ended');
    expect(h.app.mounts.mounts.get(g.mountId)?.endReason).toMatch(/agent restarted/);
    expect(h.app.mounts.isMounted(img2)).toBe(false);
  });

  it('an image set (consistency group) is mounted whole: one export per member, each served', async () => {
    const data = makeVolume('gdata', 6 * 65536, 65536);
    const wal = makeVolume('gwal', 3 * 65536, 65536, [1]);
    const a = await ScriptedAgent.connect(h.url);
    await a.sendHello('db3', h.tokens.db3!, [data, wal], { groups: [{ name: 'g', volumes: ['gdata', 'gwal'] }] });
    await a.next('welcome');
    const job = h.app.router.startJob('db3', 'g', 'full');
    await a.next('runJob', job.id);
    let seq = 0;
    for (const v of [data, wal]) {
      await a.send(envelope('beginVolume', { jobId: job.id, volume: v.name, volumeSize: v.size, chunkSize: v.chunkSize, basisImageId: '', mode: JobMode.FULL, resume: false }));
      await a.next('volumeReady', job.id);
      await a.batch(job.id, nonZeroIndexes(v).map((n) => goodChunk(v, n)), ++seq);
      await a.next('ack', job.id);
      await a.end(job.id, chunkCountOf(v), v);
    }
    await a.send(envelope('commitSet', { jobId: job.id }));
    const committed = await a.next('committed', job.id);
    await a.result(job.id, true, committed.imageId);
    await job.done;
    const id = requestId();
    await a.send(envelope('mountRequest', { requestId: id, imageId: committed.setId!, writable: true, ttlSeconds: 0 }));
    const g = await granted(a, id);
    expect(g.imageId).toBe(committed.setId);
    expect(g.exports.map((x) => [x.volume, x.size])).toEqual([['gdata', data.size], ['gwal', wal.size]]);
    for (const x of g.exports) {
      const r = await execa('nbdinfo', ['--size', `nbd://127.0.0.1:${g.nbdPort}/${x.exportName}`], { timeout: 20_000 });
      expect(Number(r.stdout.trim())).toBe(x.size);
    }
    for (const m of committed.images!) expect(h.app.mounts.isMounted(m.imageId)).toBe(true);
    await a.send(envelope('mountRelease', { mountId: g.mountId, reason: '' }));
    await expect.poll(() => h.app.mounts.mounts.get(g.mountId)?.state, { timeout: 10_000 }).toBe('ended');
    await a.close();
  }, 60_000);

  it('a malformed mount frame ends the session (not a job frame), other agents unaffected', async () => {
    const bad = await ScriptedAgent.connect(h.url);
    await bad.login('db2', h.tokens.db2!, [v2]);
    await bad.send(envelope('walFetch', { mountId: 'mnt-x', name: '../../etc/passwd' }));
    expect((await bad.closed).code).toBe(1008);
    await bad.close();
    await db1.ping();
  });
});

describe('mount protocol over TLS', () => {
  let h: ApplianceHarness | undefined;
  let dir: string;
  afterAll(async () => {
    await h?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('an appliance serving TLS serves NBD with the same certificate: the grant says tls, nbds:// with that certificate trusted works', async () => {
    dir = await mkdtemp(join(tmpdir(), 'bsn-mount-tls-'));
    await execa('openssl', [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:TRUE',
    ], { timeout: 30_000 });
    const cert = await readFile(join(dir, 'cert.pem'));
    await mkdir(join(dir, 'ca'));
    await copyFile(join(dir, 'cert.pem'), join(dir, 'ca', 'ca-cert.pem')); // libnbd trusts DIR/ca-cert.pem
    h = await startAppliance(['db1'], { tls: { cert, key: await readFile(join(dir, 'key.pem')) } });
    expect(h.url.startsWith('wss://')).toBe(true);
    const a = await ScriptedAgent.connect(h.url, undefined, { ca: cert });
    const v = makeVolume('pgdata', 4 * 65536, 65536);
    await a.login('db1', h.tokens.db1!, [v]);
    const img = await backupPg(a, h, 'db1', v);
    await a.send(envelope('mountRequest', { requestId: 'mrq-tls', imageId: img, writable: false, ttlSeconds: 0 }));
    const g = await granted(a, 'mrq-tls');
    expect(g.tls).toBe(true);
    const name = g.exports[0]!.exportName;
    const ok = await execa('nbdinfo', ['--size', `nbds://127.0.0.1:${g.nbdPort}/${name}?tls-certificates=${join(dir, 'ca')}`], { timeout: 20_000 });
    expect(Number(ok.stdout.trim())).toBe(v.size);
    // Plaintext is refused: the export is never named before STARTTLS.
    const plain = await execa('nbdinfo', ['--size', `nbd://127.0.0.1:${g.nbdPort}/${name}`], { timeout: 20_000, reject: false });
    expect(plain.exitCode).not.toBe(0);
    await a.close();
  }, 60_000);
});
