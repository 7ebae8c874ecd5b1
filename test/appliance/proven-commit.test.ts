import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { ActiveJob } from '../../appliance/server/active-job.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import {
  chunkCountOf, expectedRootOf, goodChunk, imageBytes, jobTrace, makeVolume, mutateVolume, nonZeroIndexes, ScriptedAgent, type TestVolume,
} from '../../appliance/testing/scripted-agent.js';
import { envelope, JobMode } from '../../proto/messages.js';

/**
 * Proven commits (DESIGN.md §4.2): an image commits only if the root the
 * appliance built equals the root the agent computed from what it read. Each
 * case below committed a wrong image on the code before the check: a batch
 * dropped as a "resend", a member whose seq restarted, a lost batch, an
 * agent whose basis map was not the basis. Real in-process appliance, scripted
 * agent on a real WebSocket; after each case nothing of the job is visible
 * and the same agent still commits an honest backup.
 */
const CS = 4096;
const SIZE = 12 * CS + 512; // 13 chunks, the last one short

let h: ApplianceHarness;
const agents: ScriptedAgent[] = [];
const groups = [{ name: 'pg', volumes: ['pgdata', 'pgwal'] }];

async function connect(): Promise<ScriptedAgent> {
  const a = await ScriptedAgent.connect(h.url);
  agents.push(a);
  await a.sendHello('db1', h.tokens.db1!, [makeVolume('pgdata', SIZE, CS), makeVolume('pgwal', SIZE, CS), makeVolume('solo', SIZE, CS)], { groups });
  await a.next('welcome');
  return a;
}

async function startJob(a: ScriptedAgent, volume: string, mode: 'full' | 'incremental' = 'full'): Promise<ActiveJob> {
  const job = h.app.router.startJob('db1', volume, mode);
  await a.next('runJob', job.id);
  return job;
}

/** The job failed with `code`, nothing of it is visible, the connection goes on. */
async function expectNothingCommitted(a: ScriptedAgent, job: ActiveJob, code: string): Promise<void> {
  const err = await a.next('error', job.id);
  expect(err.code).toBe(code);
  expect(await job.done).toMatchObject({ ok: false, errorCode: code });
  await job.chain;
  const t = await jobTrace(h, job.id);
  expect(t.row).toMatchObject({ state: 'failed', errorCode: code, imageId: null });
  expect(t).toMatchObject({ images: [], manifests: [], tmp: [] });
  await a.ping();
}

/** An honest full of `v`, proving the agent and appliance still work after a failure. */
async function honestFull(a: ScriptedAgent, v: TestVolume): Promise<string> {
  const job = await startJob(a, v.name);
  const { committed } = await a.transfer(job.id, v);
  expect(await job.done).toMatchObject({ ok: true });
  expect((await imageBytes(h, committed.imageId)).equals(v.data)).toBe(true);
  return committed.imageId;
}

/** Begin + every non-zero chunk of `v` in batches of `per`, with explicit seq numbers (the test picks them). */
async function beginAndSend(a: ScriptedAgent, jobId: string, v: TestVolume, seqs: number[], per = 4, patch = {}): Promise<void> {
  await a.begin(jobId, v, patch);
  await a.next('volumeReady', jobId);
  const idx = nonZeroIndexes(v);
  for (let b = 0; b * per < idx.length; b++) {
    await a.batch(jobId, idx.slice(b * per, (b + 1) * per).map((i) => goodChunk(v, i)), seqs[b]!);
  }
}

beforeAll(async () => {
  h = await startAppliance(['db1'], { resumeGraceMs: 300 });
});

afterEach(async () => {
  for (const a of agents.splice(0)) await a.close();
  expect(h.app.router.activeJobs().map((j) => j.id), 'no job left running').toEqual([]);
});

afterAll(async () => {
  await h?.close();
});

describe('an image commits only if its root equals the agent\'s', () => {
  it('a duplicate batch (same seq again) aborts the job: E_PROTOCOL, nothing visible', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const job = await startJob(a, 'solo');
    // Batch 2 is sent twice: before the fix the second was dropped silently and the job committed.
    await beginAndSend(a, job.id, v, [1, 2, 2, 3]);
    await a.end(job.id, chunkCountOf(v), v);
    await expectNothingCommitted(a, job, 'E_PROTOCOL');
    await honestFull(a, v);
  });

  it('a batch with an old seq but new chunks (reordered) aborts the job: E_PROTOCOL', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const job = await startJob(a, 'solo');
    await beginAndSend(a, job.id, v, [1, 2, 1, 4]);
    await a.end(job.id, chunkCountOf(v), v);
    await expectNothingCommitted(a, job, 'E_PROTOCOL');
  });

  it('a lost batch with an honest root: E_INTEGRITY, not an image with zeros where the chunks were', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const job = await startJob(a, 'solo');
    await a.begin(job.id, v);
    await a.next('volumeReady', job.id);
    // Chunks 4..7 never arrive (seq stays consecutive: the loss happened before numbering, e.g. in the reader).
    const idx = nonZeroIndexes(v).filter((i) => i < 4 || i > 7);
    await a.batch(job.id, idx.map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);
    await a.end(job.id, chunkCountOf(v), v);
    await expectNothingCommitted(a, job, 'E_INTEGRITY');
    await honestFull(a, v);
  });

  it('a root of other data than what was sent: E_INTEGRITY', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const job = await startJob(a, 'solo');
    await beginAndSend(a, job.id, v, [1, 2, 3, 4]);
    await a.end(job.id, chunkCountOf(v), mutateVolume(v, [12]));
    await expectNothingCommitted(a, job, 'E_INTEGRITY');
  });

  it('an incremental from an agent whose basis map is not the basis: E_INTEGRITY (the old image is kept)', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const basis = await honestFull(a, v);
    // The agent believes chunk 3 already holds new data (its map lies), so it sends only chunk 9.
    const believed = mutateVolume(v, [3]);
    const now = mutateVolume(believed, [9]);
    const job = await startJob(a, 'solo', 'incremental');
    await a.begin(job.id, now, { mode: JobMode.INCREMENTAL, basisImageId: basis });
    expect(await a.next('volumeReady', job.id)).toMatchObject({ basisAccepted: true });
    await a.batch(job.id, [goodChunk(now, 9)]);
    await a.next('ack', job.id);
    await a.end(job.id, chunkCountOf(now), now);
    await expectNothingCommitted(a, job, 'E_INTEGRITY');
    expect(h.app.catalog.listImages({ volume: 'solo' }).map((i) => i.id)).toContain(basis);
  });

  it('an EndVolume without a root is refused as malformed and commits nothing', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS);
    const job = await startJob(a, 'solo');
    await beginAndSend(a, job.id, v, [1, 2, 3, 4]);
    await a.send(envelope('endVolume', { jobId: job.id, nextIndex: chunkCountOf(v), expectedRoot: Buffer.alloc(0) }));
    const err = await a.next('error', job.id);
    expect(err.code).toBe('E_PROTOCOL');
    expect(await job.done).toMatchObject({ ok: false });
    await job.chain;
    expect(await jobTrace(h, job.id)).toMatchObject({ images: [], manifests: [], tmp: [] });
  });

  it('a group member whose seq restarts at 1 aborts the whole set (before: committed as all zeros)', async () => {
    const a = await connect();
    const data = makeVolume('pgdata', SIZE, CS);
    const wal = makeVolume('pgwal', SIZE, CS);
    const job = await startJob(a, 'pg');
    await beginAndSend(a, job.id, data, [1, 2, 3, 4]);
    await a.end(job.id, chunkCountOf(data), data);
    // The second member numbers its batches from 1 again instead of going on from 4.
    await beginAndSend(a, job.id, wal, [1, 2, 3, 4]);
    await a.end(job.id, chunkCountOf(wal), wal);
    await a.send(envelope('commitSet', { jobId: job.id }));
    await expectNothingCommitted(a, job, 'E_PROTOCOL');
    expect(h.app.catalog.listImages({ volume: 'pgwal' })).toEqual([]);
  });

  it('the expected root the agent sends is the root the appliance stores for an honest image', async () => {
    const a = await connect();
    const v = makeVolume('solo', SIZE, CS, [0, 5, 12]);
    const id = await honestFull(a, v);
    expect(h.app.catalog.image(id)!.rootDigest).toBe(expectedRootOf(v).toString('hex'));
  });
});
