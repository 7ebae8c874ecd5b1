import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { ActiveJob } from '../../appliance/server/active-job.js';
import { CHUNK_OVERHEAD } from '../../appliance/server/job-router.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import {
  chunkCountOf, goodChunk, jobTrace, makeVolume, nonZeroIndexes, ScriptedAgent, sha256, type TestVolume,
} from '../../appliance/testing/scripted-agent.js';
import { envelope, type Chunk } from '../../proto/messages.js';
import { zstdCompress } from '../../proto/shared/zstd.js';

/**
 * What one job can make the appliance hold, and for how long: a job whose
 * agent goes silent ends (E_TIMEOUT) instead of holding its volume forever;
 * a heartbeat keeps a slow job alive; zero chunks count against the flow
 * window like data; WAL arrives in fixed 4 MiB pieces, so an agent cannot
 * make the appliance keep one entry per byte.
 */
const CS = 4096;
const SIZE = 12 * CS;
// Long enough that a loaded 2-core machine answers well inside it, short enough for a test.
const IDLE_MS = 1500;

let h: ApplianceHarness;
const agents: ScriptedAgent[] = [];

async function connect(v: TestVolume): Promise<ScriptedAgent> {
  const a = await ScriptedAgent.connect(h.url);
  agents.push(a);
  await a.login('db1', h.tokens.db1!, [v]);
  return a;
}

async function started(a: ScriptedAgent, v: TestVolume): Promise<ActiveJob> {
  const job = h.app.router.startJob('db1', v.name, 'full');
  await a.next('runJob', job.id);
  await a.begin(job.id, v);
  await a.next('volumeReady', job.id);
  return job;
}

const heartbeat = (jobId: string) => envelope('jobProgress', { jobId, chunksDone: 0, chunksTotal: 0, bytesSent: 0, phase: 'heartbeat' });

async function expectFailed(job: ActiveJob, code: string): Promise<void> {
  expect(await job.done).toMatchObject({ ok: false, errorCode: code });
  await job.chain;
  expect(await jobTrace(h, job.id)).toMatchObject({ images: [], manifests: [], tmp: [] });
}

beforeAll(async () => {
  h = await startAppliance(['db1'], { jobIdleTimeoutMs: IDLE_MS, windowBytes: 1 << 20 });
});

afterEach(async () => {
  for (const a of agents.splice(0)) await a.close();
  expect(h.app.router.activeJobs().map((j) => j.id), 'no job left running').toEqual([]);
});

afterAll(async () => {
  await h?.close();
});

describe('job inactivity', () => {
  it('an agent silent after BeginVolume: the job fails E_TIMEOUT, the volume is free for the next job', async () => {
    const v = makeVolume('pgdata', SIZE, CS);
    const a = await connect(v);
    const job = await started(a, v);
    const t0 = Date.now();
    await expectFailed(job, 'E_TIMEOUT');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(IDLE_MS - 50);
    expect((await a.next('error', job.id)).code).toBe('E_TIMEOUT');
    // The connection is fine and a new job on the same volume is not E_BUSY.
    const next = h.app.router.startJob('db1', v.name, 'full');
    await a.next('runJob', next.id);
    await a.transfer(next.id, v);
    expect(await next.done).toMatchObject({ ok: true });
  });

  it('heartbeats keep a job alive well past the idle timeout, and it commits', async () => {
    const v = makeVolume('pgdata', SIZE, CS);
    const a = await connect(v);
    const job = await started(a, v);
    // Three idle periods of heartbeats only (a long checkpoint, say): the job must survive them.
    const until = Date.now() + 3 * IDLE_MS;
    while (Date.now() < until) {
      await a.send(heartbeat(job.id));
      await a.ping();
      expect(job.finished, 'the job is still running').toBe(false);
      await new Promise((r) => setTimeout(r, IDLE_MS / 4));
    }
    const idx = nonZeroIndexes(v);
    await a.batch(job.id, idx.map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);
    await a.end(job.id, chunkCountOf(v), v);
    const c = await a.next('committed', job.id);
    await a.result(job.id, true, c.imageId);
    expect(await job.done).toMatchObject({ ok: true, imageId: c.imageId });
  });
});

describe('flow window', () => {
  it('a flood of zero chunks without waiting for acks is charged against the window and fails the job', async () => {
    // A volume of 2^20 chunks so indexes never run out. One frame of 200 000 zero chunks is
    // ≈ 2.4 MB on the wire but 200 000 decoded chunk objects: charged at 64 bytes each it is
    // 12.8 MB, above 2 × window (1 MiB) + 8 MiB, so it fails on arrival (before: charged 0 bytes).
    // Its own appliance with the default idle timeout: encoding and decoding 200 000 chunks takes
    // seconds on a loaded machine, and this case is about the window, not about silence.
    const own = await startAppliance(['db1'], { windowBytes: 1 << 20 });
    try {
      const v: TestVolume = { name: 'pgdata', size: 2 ** 20 * CS, chunkSize: CS, data: Buffer.alloc(0) };
      const a = await ScriptedAgent.connect(own.url);
      agents.push(a);
      await a.login('db1', own.tokens.db1!, [v]);
      const job = own.app.router.startJob('db1', v.name, 'full');
      await a.next('runJob', job.id);
      await a.begin(job.id, v);
      await a.next('volumeReady', job.id);
      const per = 200_000;
      expect(per * CHUNK_OVERHEAD).toBeGreaterThan(2 * (1 << 20) + (8 << 20));
      const zero = (i: number): Chunk => ({ index: i, digest: Buffer.alloc(0), zero: true, data: Buffer.alloc(0), plainLength: CS });
      await a.batch(job.id, Array.from({ length: per }, (_, k) => zero(k)));
      const out = await job.done;
      expect(out).toMatchObject({ ok: false, errorCode: 'E_PROTOCOL' });
      expect(out.errorMessage).toMatch(/bytes in flight/);
      await job.chain;
      expect(await jobTrace(own, job.id)).toMatchObject({ images: [], manifests: [], tmp: [] });
    } finally {
      await own.close();
    }
  });
});

describe('WAL pieces', () => {
  async function withPgInfo(a: ScriptedAgent, job: ActiveJob): Promise<void> {
    await a.send(envelope('pgBackupInfo', {
      jobId: job.id, labelFile: 'START WAL LOCATION: 0/2000028', spcmapFile: '', startLsn: '0/2000028', stopLsn: '0/2000100', timeline: 1,
      replayLsn: '', exclusive: false, serverVersion: 150000, role: 'primary', pausedSeconds: 0, backupSeconds: 0.1, walSegmentSize: 16 << 20,
    }));
  }
  const piece = (jobId: string, offset: number, plain: Buffer, fileSize = 16 << 20) => envelope('walPiece', {
    jobId, fileName: '000000010000000000000002', offset, data: zstdCompress(plain), plainLength: plain.length, digest: sha256(plain), fileSize,
  });

  it('a piece that is not at a 4 MiB boundary (one entry per byte otherwise): E_PROTOCOL', async () => {
    const v = makeVolume('pgdata', SIZE, CS);
    const a = await connect(v);
    const job = await started(a, v);
    await withPgInfo(a, job);
    await a.send(piece(job.id, 1, randomBytes(100)));
    expect((await a.next('error', job.id)).code).toBe('E_PROTOCOL');
    await expectFailed(job, 'E_PROTOCOL');
  });

  it('a short piece that is not the end of the file: E_PROTOCOL', async () => {
    const v = makeVolume('pgdata', SIZE, CS);
    const a = await connect(v);
    const job = await started(a, v);
    await withPgInfo(a, job);
    await a.send(piece(job.id, 0, randomBytes(1000)));
    await expectFailed(job, 'E_PROTOCOL');
  });

  it('the same piece resent (after a resume) is accepted once; a different piece at that offset is E_PROTOCOL', async () => {
    const v = makeVolume('pgdata', SIZE, CS);
    const a = await connect(v);
    const job = await started(a, v);
    await withPgInfo(a, job);
    const plain = randomBytes(4096);
    await a.send(piece(job.id, 0, plain, 4096));
    await a.send(piece(job.id, 0, plain, 4096));
    await a.ping();
    expect(job.finished).toBe(false);
    await a.send(piece(job.id, 0, randomBytes(4096), 4096));
    await expectFailed(job, 'E_PROTOCOL');
  });
});
