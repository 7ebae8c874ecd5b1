/**
 * Ten writable clones of one image at once (issue 9, Tests): the appliance's
 * own MountManager + NBD listener + real overlays (an in-process appliance
 * on a data dir holding one committed image), ten mounts created, ten real
 * NBD clients (the libnbd Python binding, one handle per clone, all
 * connected together) each writing something different — a whole chunk of
 * its own, a partial write into one chunk every clone writes, a trim on
 * every other clone — then each reading its whole device. Each sees the
 * image plus exactly its own writes; the overlays hold only what was
 * written; the image's store files and verify are unchanged.
 *
 * NBD level on purpose: PostgreSQL on clones is covered by
 * test/agent/mount-nbd.test.ts (three clones, each a running postmaster);
 * what ten add is the isolation of ten overlays of one image, which needs
 * no postmaster.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StoreRig, rigVolume, type RigVolume } from '../../appliance/retention/store-rig.js';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import { MOUNTS_DIR } from '../../appliance/mounts/mount-manager.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { storeFingerprint } from '../../appliance/testing/stored-image.js';
import { waitFor } from '../support/wait-for.js';

const run = promisify(execFile);
const CS = 65536;
const CHUNKS = 64;
const SIZE = CHUNKS * CS - 3000; // a short last chunk
const CLONES = 10;
/** The chunk every clone writes part of (each its own bytes: ten copy-ups of one image chunk). */
const SHARED_AT = 5 * CS + 777;
const SHARED_LEN = 1000;
const OWN_CHUNK = (i: number) => 10 + i;
const TRIMMED_CHUNK = 40;
const ZERO_CHUNKS = [2, 3, 50];

const dirs = new TempDirs();
let appl: ApplianceHarness;
let vol: RigVolume;
let imageId: string;
let rootDigest: string;

/** What clone i must read: the image, its own chunk filled with i + 1, its bytes at SHARED_AT, its trim (even clones). */
function expectedOf(i: number): Buffer {
  const b = Buffer.from(vol.data);
  b.fill(i + 1, OWN_CHUNK(i) * CS, (OWN_CHUNK(i) + 1) * CS);
  b.fill(0x80 + i, SHARED_AT, SHARED_AT + SHARED_LEN);
  if (i % 2 === 0) b.fill(0, TRIMMED_CHUNK * CS, (TRIMMED_CHUNK + 1) * CS);
  return b;
}

// Ten libnbd handles connected at once; writes interleaved clone by clone, then a flush each, then every clone's full read.
const CLIENTS_PY = `
import hashlib, json, sys
import nbd
port, names, cs, size = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shared_at, shared_len, trimmed = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
hs = []
for n in names:
    h = nbd.NBD()
    h.connect_uri("nbd://127.0.0.1:%d/%s" % (port, n))
    hs.append(h)
for i, h in enumerate(hs):
    h.pwrite(bytes([i + 1]) * cs, (10 + i) * cs)
for i, h in enumerate(hs):
    h.pwrite(bytes([0x80 + i]) * shared_len, shared_at)
for i, h in enumerate(hs):
    if i % 2 == 0:
        h.trim(cs, trimmed * cs)
for h in hs:
    h.flush()
out = []
for h in hs:
    d = hashlib.sha256()
    off = 0
    while off < size:
        n = min(1 << 20, size - off)
        d.update(h.pread(n, off))
        off += n
    out.append({"size": h.get_size(), "sha256": d.hexdigest(), "writable": not h.is_read_only()})
for h in hs:
    h.shutdown()
print(json.dumps(out))
`;

beforeAll(async () => {
  const dataDir = await dirs.make('bsn-clones-');
  // One committed image in an appliance data dir, made without an agent (the GC tests' rig), then the appliance opens it.
  const rig = await StoreRig.open(dataDir);
  vol = rigVolume('pgdata', SIZE, CS, ZERO_CHUNKS);
  const m = await rig.commit(vol);
  await rig.close();
  imageId = m.imageId;
  appl = await startAppliance(['db1'], { dataDir });
  rootDigest = appl.app.catalog.image(imageId)!.rootDigest;
});

afterAll(async () => {
  await appl?.close();
  await dirs.cleanup();
});

describe('ten writable clones of one image at once', () => {
  it('each of ten concurrent NBD clients sees the image plus exactly its own writes; overlays hold only what was written; the image verifies unchanged', async () => {
    const { app } = appl;
    const port = app.nbdPort!;
    expect(port).toBeGreaterThan(0);
    const storeDir = join(appl.dataDir, 'store');
    const before = await storeFingerprint(storeDir);

    const mounts = [];
    const createdMs: number[] = [];
    for (let i = 0; i < CLONES; i++) {
      const t = performance.now();
      mounts.push(await app.mounts.create({ imageRef: imageId, agent: app.catalog.agent('db1')!, peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' }));
      createdMs.push(performance.now() - t);
    }
    console.log(`clone creation: 1st ${createdMs[0]!.toFixed(1)} ms, 10th ${createdMs[9]!.toFixed(1)} ms`);
    try {
      const names = mounts.map((m) => m.exports[0]!.exportName);
      expect(new Set(names).size).toBe(CLONES);

      const { stdout } = await run('/usr/bin/python3', ['-c', CLIENTS_PY, String(port), JSON.stringify(names), String(CS), String(SIZE),
        String(SHARED_AT), String(SHARED_LEN), String(TRIMMED_CHUNK)], { timeout: 120_000 });
      const seen = JSON.parse(stdout) as Array<{ size: number; sha256: string; writable: boolean }>;
      expect(seen).toHaveLength(CLONES);
      for (const [i, s] of seen.entries()) {
        expect(s.size).toBe(SIZE);
        expect(s.writable).toBe(true);
        expect(s.sha256, `clone ${i} sees the image plus its own writes only`).toBe(createHash('sha256').update(expectedOf(i)).digest('hex'));
      }
      for (const m of mounts) await waitFor(`the connections of ${m.id} to end`, () => app.mounts.connectionsOf(m.id) === 0, { timeoutMs: 20_000 });

      // Overlay space = what that clone wrote: its own chunk + the shared chunk's copy-up (a trim stores nothing).
      for (const m of mounts) {
        const st = await stat(join(appl.dataDir, MOUNTS_DIR, m.exports[0]!.overlay!, 'data'));
        expect(st.blocks * 512, `overlay of ${m.id}`).toBeGreaterThanOrEqual(2 * CS);
        expect(st.blocks * 512, `overlay of ${m.id}`).toBeLessThanOrEqual(2 * CS + 64 * 1024);
      }
    } finally {
      for (const m of mounts) await app.mounts.remove(m.id, 'test done');
    }
    for (const m of mounts) await expect(stat(join(appl.dataDir, MOUNTS_DIR, m.exports[0]!.overlay!))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(app.mounts.isMounted(imageId)).toBe(false);

    // The image: not one store file changed, verify clean.
    expect(await storeFingerprint(storeDir)).toBe(before);
    const report = await verifyImage(app.store, app.manifests, imageId, rootDigest);
    expect(report.ok, JSON.stringify(report)).toBe(true);
    expect(report.chunksChecked + report.chunksZero).toBe(CHUNKS);
  }, 120_000);
});
