import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Catalog } from '../../appliance/catalog/catalog.js';
import type { MountBackend, MountImage } from '../../appliance/mounts/mount-backend.js';
import { MountManager, MOUNTS_DIR } from '../../appliance/mounts/mount-manager.js';
import type { NbdExport } from '../../appliance/nbd/nbd-export.js';
import { createLogger } from '../../proto/shared/log.js';
import { connect, type Socket } from 'node:net';
import { NbdServer } from '../../appliance/nbd/nbd-server.js';
import { encodeClientFlags, encodeExportRequest, encodeOption } from '../../appliance/nbd/nbd-codec.js';
import { Opt, Rep } from '../../appliance/nbd/nbd-layout.js';
import { codeOf } from '../support/error-code.js';
import { tempDirEach } from '../support/temp-dir.js';
import { waitFor } from '../support/wait-for.js';

const log = createLogger('test-mounts', 'silent');

/** A raw NBD client through GO (fixed newstyle): resolves once the export is being served. */
async function nbdClient(port: number, name: string): Promise<{ socket: Socket; closed: Promise<void>; isClosed(): boolean }> {
  const socket = connect(port, '127.0.0.1');
  let isClosed = false;
  const closed = new Promise<void>((resolve) => socket.on('close', () => { isClosed = true; resolve(); }));
  socket.on('error', () => undefined);
  let buf = Buffer.alloc(0);
  const acked = new Promise<void>((resolve, reject) => {
    socket.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      // greeting (18) then option replies (20-byte header + data) until ACK (type 1)
      let at = 18;
      while (buf.length >= at + 20) {
        const len = buf.readUInt32BE(at + 16);
        if (buf.readUInt32BE(at + 12) === Rep.ACK) return resolve();
        if (buf.readUInt32BE(at + 12) >= 0x80000000) return reject(new Error('GO refused'));
        at += 20 + len;
      }
    });
    void closed.then(() => reject(new Error('closed during GO')));
  });
  socket.write(Buffer.concat([encodeClientFlags(3), encodeOption(Opt.GO, encodeExportRequest(name, []))]));
  await acked;
  return { socket, closed, isClosed: () => isClosed };
}

const ROOT = 'ab'.repeat(32);

/** A backend that records what it was asked: overlays are directories with one file, exports serve zeros. */
function fakeBackend() {
  const opened: { image: MountImage; overlayDir: string | null; closed: boolean }[] = [];
  const backend: MountBackend = {
    async createOverlay(dir) {
      await mkdir(dir);
      await writeFile(join(dir, 'map'), 'overlay');
    },
    async open(image, overlayDir) {
      const rec = { image, overlayDir, closed: false };
      opened.push(rec);
      const exp: NbdExport = {
        size: image.size, chunkSize: image.chunkSize, readOnly: overlayDir === null, canMultiConn: true,
        read: async (offset, length) => [{ offset, hole: length }],
        runs: async (_o, length) => [{ length, zero: true }],
      };
      return { export: exp, close: async () => void (rec.closed = true) };
    },
  };
  return { backend, opened };
}

describe('MountManager', () => {
  const tmp = tempDirEach('bsn-mounts-');
  let cat: Catalog;
  let clock: number;
  const managers: MountManager[] = [];
  const manager = (backend: MountBackend) => {
    const m = new MountManager({ catalog: cat, backend, dataDir: tmp.path, log, now: () => clock, sweepEveryMs: 60_000 });
    managers.push(m);
    return m;
  };
  const agent = (name: string) => cat.agent(name)!;

  beforeEach(() => {
    clock = Date.parse('2026-11-30T12:00:00.000Z');
    cat = Catalog.open(join(tmp.path, 'catalog.sqlite'));
    cat.addAgent('db1');
    cat.addAgent('db2');
    const base = { jobId: null, basisImageId: null, volumeSize: 1 << 20, chunkSize: 65536, kind: 'full', createdAt: '2026-11-30T11:00:00.000Z' };
    cat.insertImage({ ...base, id: 'img-1', agent: 'db1', volume: 'pgdata', rootDigest: ROOT });
    cat.insertImage({ ...base, id: 'img-2', agent: 'db1', volume: 'pgdata', rootDigest: 'cd'.repeat(32) });
    cat.insertImages([
      { ...base, id: 'img-s1', agent: 'db2', volume: 'data', rootDigest: 'ef'.repeat(32), setId: 'set-1' },
      { ...base, id: 'img-s2', agent: 'db2', volume: 'wal', rootDigest: '12'.repeat(32), setId: 'set-1' },
    ]);
  });
  afterEach(async () => {
    for (const m of managers.splice(0)) await m.close();
    cat.close();
  });

  it('hands out unguessable, unique export names (128 random bits, nothing of the image id) and resolves each only for its peer', async () => {
    const { backend } = fakeBackend();
    const m = manager(backend);
    await m.start();
    const names = new Set<string>();
    for (let i = 0; i < 16; i++) {
      const row = await m.create({ imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: false, ttlSeconds: 0, requestedBy: 'agent' });
      for (const x of row.exports) {
        expect(x.exportName).toMatch(/^[0-9a-f]{32}$/);
        expect(x.exportName).not.toContain('img');
        names.add(x.exportName);
      }
      await m.remove(row.id, 'test');
    }
    expect(names.size).toBe(16);
    const row = await m.create({ imageRef: 'img-1', agent: agent('db1'), peerAddress: '::ffff:127.0.0.1', writable: false, ttlSeconds: 0, requestedBy: 'agent' });
    const name = row.exports[0]!.exportName;
    // The address it was handed to, in either spelling of an IPv4 address.
    expect(await m.resolve(name, { address: '127.0.0.1' })).toBeDefined();
    expect(await m.resolve(name, { address: '::ffff:127.0.0.1' })).toBeDefined();
    // Another address, or a name never handed out: nothing.
    expect(await m.resolve(name, { address: '127.0.0.2' })).toBeUndefined();
    expect(await m.resolve(name.replace(/.$/, (c) => (c === '0' ? '1' : '0')), { address: '127.0.0.1' })).toBeUndefined();
    expect(await m.resolve('img-1', { address: '127.0.0.1' })).toBeUndefined();
    expect(m.isMounted('img-1')).toBe(true);
    expect(m.isMounted('img-2')).toBe(false);
  });

  it('refuses an expired mount, sweeps it, and refuses a removed one (an open connection fails every later request)', async () => {
    const { backend, opened } = fakeBackend();
    const m = manager(backend);
    await m.start();
    const short = await m.create({ imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: false, ttlSeconds: 60, requestedBy: 'agent' });
    expect(short.expiresAt).toBe('2026-11-30T12:01:00.000Z');
    expect(await m.resolve(short.exports[0]!.exportName, { address: '127.0.0.1' })).toBeDefined();
    clock += 60_000;
    expect(await m.resolve(short.exports[0]!.exportName, { address: '127.0.0.1' })).toBeUndefined();
    await m.sweep();
    expect(m.mounts.get(short.id)).toMatchObject({ state: 'ended' });
    expect(m.isMounted('img-1')).toBe(false);

    const w = await m.create({ imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' });
    const exp = (await m.resolve(w.exports[0]!.exportName, { address: '127.0.0.1' }))!;
    expect(await exp.read(0, 4096)).toEqual([{ offset: 0, hole: 4096 }]);
    expect(m.connectionsOf(w.id)).toBe(1);
    expect(await readdir(join(tmp.path, MOUNTS_DIR))).toEqual([`${w.id}.0`]);
    const ended = await m.remove(w.id, 'removed by operator');
    expect(ended).toMatchObject({ state: 'ended', endReason: 'removed by operator' });
    expect(await codeOf(exp.read(0, 4096))).toBe('E_NOT_FOUND');
    expect(await m.resolve(w.exports[0]!.exportName, { address: '127.0.0.1' })).toBeUndefined();
    expect(await readdir(join(tmp.path, MOUNTS_DIR))).toEqual([]);
    expect(opened.at(-1)!.closed).toBe(true);
    exp.release!();
    expect(m.connectionsOf(w.id)).toBe(0);
  });

  it('mounts every member of an image set, refuses a damaged or unknown image, and never builds a path from input', async () => {
    const { backend } = fakeBackend();
    const m = manager(backend);
    await m.start();
    const set = await m.create({ imageRef: 'set-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'operator' });
    expect(set.exports.map((x) => [x.volume, x.imageId])).toEqual([['data', 'img-s1'], ['wal', 'img-s2']]);
    expect(set.exports.map((x) => x.overlay)).toEqual([`${set.id}.0`, `${set.id}.1`]);
    expect(m.isMounted('img-s2')).toBe(true);
    for (const ref of ['../../etc/passwd', 'img-1/../../x', '', 'nope']) {
      expect(await codeOf(m.create({ imageRef: ref, agent: agent('db1'), peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' }))).toBe('E_NOT_FOUND');
    }
    for (const id of ['../catalog.sqlite', `${set.id}/../..`, 'mnt-x']) {
      expect(await codeOf(m.remove(id, 'x'))).toBe('E_NOT_FOUND');
    }
    cat.recordDamage('img-2', 'pack p1', 'gone');
    expect(await codeOf(m.create({ imageRef: 'img-2', agent: agent('db1'), peerAddress: '127.0.0.1', writable: false, ttlSeconds: 0, requestedBy: 'agent' }))).toBe('E_STORE_CORRUPT');
    expect((await readdir(join(tmp.path, MOUNTS_DIR))).sort()).toEqual([`${set.id}.0`, `${set.id}.1`]);
  });

  it('remove closes the open NBD connections of the mount (the server is told through the export), not those of another mount', async () => {
    const { backend } = fakeBackend();
    const m = manager(backend);
    await m.start();
    const server = await NbdServer.start({ resolve: m.resolve });
    try {
      const req = { imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' as const };
      const gone = await m.create(req);
      const kept = await m.create(req);
      const a = await nbdClient(server.port, gone.exports[0]!.exportName);
      const b = await nbdClient(server.port, kept.exports[0]!.exportName);
      expect(m.connectionsOf(gone.id)).toBe(1);
      await m.remove(gone.id, 'removed by operator');
      // Before: the connection stayed open and each later request failed (EIO) while the client kept its device.
      await a.closed;
      await waitFor('the removed mount\'s connections to close', () => m.connectionsOf(gone.id) === 0);
      expect(b.isClosed()).toBe(false);
      expect(m.connectionsOf(kept.id)).toBe(1);
      b.socket.destroy();
    } finally {
      await server.close();
    }
  });

  it('bounds live mounts per agent', async () => {
    const { backend } = fakeBackend();
    const m = new MountManager({ catalog: cat, backend, dataDir: tmp.path, log, limits: { perAgent: 2 } });
    managers.push(m);
    await m.start();
    const req = { imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: false, ttlSeconds: 0, requestedBy: 'agent' as const };
    await m.create(req);
    await m.create(req);
    expect(await codeOf(m.create(req))).toBe('E_BUSY');
    await m.create({ ...req, agent: agent('db2') });
  });

  it('at start ends every mount of the previous process and removes its overlays and orphaned ones, leaving what is not ours', async () => {
    const { backend } = fakeBackend();
    const first = manager(backend);
    await first.start();
    const w = await first.create({ imageRef: 'img-1', agent: agent('db1'), peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' });
    const r = await first.create({ imageRef: 'img-2', agent: agent('db1'), peerAddress: '127.0.0.1', writable: false, ttlSeconds: 0, requestedBy: 'agent' });
    // An overlay no row names (a crash between creating it and the catalog insert), and a file that is not ours.
    await mkdir(join(tmp.path, MOUNTS_DIR, 'mnt-abc-0123456789ab.0'));
    await writeFile(join(tmp.path, MOUNTS_DIR, 'notes.txt'), 'operator file');
    managers.splice(managers.indexOf(first), 1); // the process "dies": nothing of it runs its close

    const second = manager(backend);
    const started = await second.start();
    expect(started.ended.sort()).toEqual([w.id, r.id].sort());
    expect(started.removedOverlays.sort()).toEqual([`${w.id}.0`, 'mnt-abc-0123456789ab.0'].sort());
    expect(await readdir(join(tmp.path, MOUNTS_DIR))).toEqual(['notes.txt']);
    expect(second.mounts.get(w.id)).toMatchObject({ state: 'ended', endReason: expect.stringMatching(/appliance restarted/) });
    expect(await second.resolve(w.exports[0]!.exportName, { address: '127.0.0.1' })).toBeUndefined();
    expect(second.isMounted('img-1')).toBe(false);
  });
});
