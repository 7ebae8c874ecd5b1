import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Catalog } from '../../appliance/catalog/catalog.js';
import { rollForward } from '../../appliance/server/appliance.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import {
  chunkCountOf, goodChunk, imageBytes, jobTrace, makeVolume, mutateVolume, nonZeroIndexes, ScriptedAgent, type TestVolume,
} from '../../appliance/testing/scripted-agent.js';
import { FsManifestStore } from '../../appliance/store/fs-manifest-store.js';
import { buildManifest, listManifests, newImageId, newSetId, readManifest, writeManifest } from '../../appliance/store/manifest.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { envelope, JobMode, type MessageMap } from '../../proto/messages.js';

/**
 * Consistency groups on the appliance (DESIGN.md §4.4, §5), against a real
 * in-process appliance and a scripted agent: the members of a group job are
 * committed together as one image set or not at all; a member alone is
 * refused; a crash inside the set's commit leaves no partial set visible.
 */
const CS = 4096;
const SIZE = 12 * CS + 512;

let h: ApplianceHarness;
const agents: ScriptedAgent[] = [];
let data: TestVolume;
let wal: TestVolume;

async function connect(groups = [{ name: 'pg', volumes: ['pgdata', 'pgwal'] }]): Promise<ScriptedAgent> {
  const a = await ScriptedAgent.connect(h.url);
  agents.push(a);
  await a.sendHello('db1', h.tokens.db1!, [data, wal], { groups });
  await a.next('welcome');
  return a;
}

/** One member, as an honest agent sends it; `seq` goes on across members. Returns the last seq. */
async function sendMember(a: ScriptedAgent, jobId: string, v: TestVolume, seq: number, basis?: { imageId: string; changed: number[] }): Promise<number> {
  await a.send(envelope('beginVolume', {
    jobId, volume: v.name, volumeSize: v.size, chunkSize: v.chunkSize, basisImageId: basis?.imageId ?? '',
    mode: basis ? JobMode.INCREMENTAL : JobMode.FULL, resume: false,
  }));
  const ready = await a.next('volumeReady', jobId);
  const indexes = ready.basisAccepted && basis ? basis.changed : nonZeroIndexes(v);
  for (let i = 0; i < indexes.length; i += 4) {
    await a.batch(jobId, indexes.slice(i, i + 4).map((n) => goodChunk(v, n)), ++seq);
    await a.next('ack', jobId);
  }
  await a.end(jobId, chunkCountOf(v), v);
  return seq;
}

beforeAll(async () => {
  h = await startAppliance(['db1']);
  data = makeVolume('pgdata', SIZE, CS, [3]);
  wal = makeVolume('pgwal', SIZE, CS, [5, 6]);
});

afterEach(async () => {
  for (const a of agents.splice(0)) await a.close();
});

afterAll(async () => {
  await h?.close();
});

describe('consistency group on the appliance', () => {
  it('commits every member together as one image set, then an incremental set on their bases', async () => {
    const a = await connect();
    const job = h.app.router.startJob('db1', 'pg', 'full');
    const run = await a.next('runJob', job.id);
    expect(run.volume).toBe('pg');
    let seq = await sendMember(a, job.id, data, 0);
    seq = await sendMember(a, job.id, wal, seq);
    // Both maps are durable, but nothing is visible before CommitSet.
    expect((await jobTrace(h, job.id)).manifests).toEqual([]);
    expect(h.app.catalog.listImages({ volume: 'pgwal' })).toEqual([]);
    await a.send(envelope('commitSet', { jobId: job.id }));
    const committed: MessageMap['committed'] = await a.next('committed', job.id);
    expect(committed.setId).toMatch(/^set-\d{8}t\d{6}z-[0-9a-f]{8}$/);
    expect(committed.images!.map((i) => i.volume)).toEqual(['pgdata', 'pgwal']);
    expect(committed.imageId).toBe(committed.images![0]!.imageId);
    await a.result(job.id, true, committed.imageId);
    expect(await job.done).toMatchObject({ ok: true, imageId: committed.imageId });

    const ids = committed.images!.map((i) => i.imageId);
    for (const [i, v] of [data, wal].entries()) {
      const img = h.app.catalog.image(ids[i]!)!;
      expect(img).toMatchObject({ volume: v.name, setId: committed.setId, kind: 'full', jobId: job.id });
      expect((await imageBytes(h, ids[i]!)).equals(v.data)).toBe(true);
      const m = await readManifest(join(h.dataDir, 'store'), ids[i]!);
      expect(m.set).toEqual({ id: committed.setId, images: ids });
    }

    // Incremental: each member is checked against its own last image.
    const data2 = mutateVolume(data, [0, 7]);
    const wal2 = mutateVolume(wal, [11]);
    const inc = h.app.router.startJob('db1', 'pg', 'incremental');
    await a.next('runJob', inc.id);
    seq = await sendMember(a, inc.id, data2, 0, { imageId: ids[0]!, changed: [0, 7] });
    await sendMember(a, inc.id, wal2, seq, { imageId: ids[1]!, changed: [11] });
    await a.send(envelope('commitSet', { jobId: inc.id }));
    const c2 = await a.next('committed', inc.id);
    await a.result(inc.id, true, c2.imageId);
    expect(await inc.done).toMatchObject({ ok: true });
    const ids2 = c2.images!.map((i) => i.imageId);
    expect(h.app.catalog.image(ids2[0]!)).toMatchObject({ kind: 'incremental', basisImageId: ids[0], setId: c2.setId });
    expect(h.app.catalog.image(ids2[1]!)).toMatchObject({ kind: 'incremental', basisImageId: ids[1], setId: c2.setId });
    expect((await imageBytes(h, ids2[0]!)).equals(data2.data)).toBe(true);
    expect((await imageBytes(h, ids2[1]!)).equals(wal2.data)).toBe(true);
    data = data2;
    wal = wal2;
  });

  it('refuses a member volume backed up alone (E_USAGE) and an unknown target', async () => {
    await connect();
    const err = (() => {
      try {
        h.app.router.startJob('db1', 'pgwal', 'full');
      } catch (e) {
        return e;
      }
      return null;
    })();
    expect(isBlocksnapError(err, 'E_USAGE')).toBe(true);
    expect(String((err as Error).message)).toMatch(/back up group pg instead/);
    expect(() => h.app.router.startJob('db1', 'nothing', 'full')).toThrow(/no volume or group nothing/);
  });

  it('CommitSet before every member ended is E_PROTOCOL and leaves nothing visible', async () => {
    const a = await connect();
    const before = h.app.catalog.listImages().length;
    const job = h.app.router.startJob('db1', 'pg', 'full');
    await a.next('runJob', job.id);
    await sendMember(a, job.id, data, 0);
    await a.send(envelope('commitSet', { jobId: job.id }));
    const e = await a.next('error', job.id);
    expect(e.code).toBe('E_PROTOCOL');
    expect(e.message).toMatch(/CommitSet before pgwal ended/);
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_PROTOCOL' });
    await job.chain;
    const trace = await jobTrace(h, job.id);
    expect(trace).toMatchObject({ images: [], manifests: [], tmp: [] });
    expect(trace.row!.state).toBe('failed');
    expect(h.app.catalog.listImages().length).toBe(before);
  });

  it('refuses a Hello whose group names a volume it does not have, or one volume in two groups', async () => {
    for (const groups of [[{ name: 'pg', volumes: ['pgdata', 'ghost'] }], [{ name: 'g1', volumes: ['pgdata'] }, { name: 'g2', volumes: ['pgdata'] }], [{ name: 'pgwal', volumes: ['pgdata'] }]]) {
      const a = await ScriptedAgent.connect(h.url);
      agents.push(a);
      await a.sendHello('db1', h.tokens.db1!, [data, wal], { groups });
      const e = await a.next('error');
      expect(e.code).toBe('E_PROTOCOL');
      await a.closed;
    }
  });
});

describe('roll-forward of image sets', () => {
  it('deletes the manifest of an incomplete set and lists no image of it; a complete set is listed whole', async () => {
    const root = await mkdtemp(join(tmpdir(), 'bsn-rollforward-'));
    const storeDir = join(root, 'store');
    const catalog = Catalog.open(join(root, 'catalog.sqlite'));
    try {
      catalog.addAgent('db1');
      const base = {
        agent: 'db1', volumeSize: 1 << 20, chunkSize: 65536, kind: 'full' as const, basisImageId: null, jobId: 'job-1',
        rootDigest: 'ab'.repeat(32), stats: {},
      };
      // A crash after the first member's manifest: the second was never written.
      const partial = { id: newSetId(), images: [newImageId(), newImageId()] };
      await writeManifest(storeDir, buildManifest({ ...base, imageId: partial.images[0], volume: 'pgdata', set: partial }));
      const whole = { id: newSetId(), images: [newImageId(), newImageId()] };
      await writeManifest(storeDir, buildManifest({ ...base, imageId: whole.images[0], volume: 'pgdata', set: whole, jobId: 'job-2' }));
      await writeManifest(storeDir, buildManifest({ ...base, imageId: whole.images[1], volume: 'pgwal', set: whole, jobId: 'job-2' }));

      expect(await rollForward(catalog, new FsManifestStore(storeDir), false)).toBe(2);
      expect(await listManifests(storeDir)).toEqual([...whole.images].sort());
      expect(catalog.image(partial.images[0]!)).toBeUndefined();
      expect(catalog.listImages().map((i) => [i.id, i.setId]).sort()).toEqual(whole.images.map((i) => [i, whole.id]).sort());
      expect(await readdir(join(storeDir, 'tmp'))).toEqual([]);
      // Idempotent: a second start changes nothing.
      expect(await rollForward(catalog, new FsManifestStore(storeDir), false)).toBe(0);
    } finally {
      catalog.close();
      await rm(root, { recursive: true, force: true });
    }
  });
});
