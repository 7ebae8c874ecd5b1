import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { ActiveJob } from '../../appliance/server/active-job.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import {
  chunkCountOf, expectedRootOf, goodChunk, imageBytes, jobTrace, makeVolume, mutateVolume, plainOf, ScriptedAgent, type TestVolume,
} from '../../appliance/testing/scripted-agent.js';
import { envelope, JobMode } from '../../proto/messages.js';

/**
 * Job routing against a real in-process appliance and scripted agents on
 * real WebSockets: a job only answers to the agent it was given to, a basis
 * that is not the volume's last image is refused (the job becomes a full), a
 * failed job never blocks its volume, and success is only what was committed.
 */
const CS = 4096;
const SIZE = 10 * CS + 1000; // 11 chunks, the last one 1000 bytes

let h: ApplianceHarness;
let db2: ScriptedAgent;
const agents: ScriptedAgent[] = [];

const vol = (name = 'pgdata'): TestVolume => makeVolume(name, SIZE, CS, [4]);

async function login(name: string, volumes = [vol(), vol('basisvol')]): Promise<ScriptedAgent> {
  const a = await ScriptedAgent.connect(h.url);
  agents.push(a);
  await a.login(name, h.tokens[name]!, volumes);
  return a;
}

async function start(a: ScriptedAgent, agent: string, volume: string, mode: 'full' | 'incremental' = 'full'): Promise<ActiveJob> {
  const job = h.app.router.startJob(agent, volume, mode);
  await a.next('runJob', job.id);
  return job;
}

/** A complete, honest backup whose image must read back as the volume. */
async function goodBackup(a: ScriptedAgent, agent: string, v: TestVolume, opts: { basisImageId?: string; changed?: number[] } = {}) {
  const job = await start(a, agent, v.name, opts.basisImageId === undefined ? 'full' : 'incremental');
  const { ready, committed } = await a.transfer(job.id, v, opts);
  expect(await job.done).toMatchObject({ ok: true, imageId: committed.imageId });
  expect((await imageBytes(h, committed.imageId)).equals(v.data), 'image reads back as the volume').toBe(true);
  return { job, ready, image: h.app.catalog.image(committed.imageId)! };
}

async function othersKeepWorking(): Promise<void> {
  if (!db2.isOpen) db2 = await login('db2');
  await goodBackup(db2, 'db2', vol());
}

/** A job that got past BeginVolume and stored chunks 0 and 1. */
async function transferring(a: ScriptedAgent, agent: string, v: TestVolume): Promise<ActiveJob> {
  const job = await start(a, agent, v.name);
  await a.begin(job.id, v);
  await a.next('volumeReady', job.id);
  await a.batch(job.id, [goodChunk(v, 0), goodChunk(v, 1)]);
  await a.next('ack', job.id);
  return job;
}

/** Every job frame an agent can send, all naming `jobId`. */
function jobFrames(jobId: string, v: TestVolume, seq: number) {
  return [
    envelope('beginVolume', { jobId, volume: v.name, volumeSize: v.size, chunkSize: v.chunkSize, basisImageId: '', mode: JobMode.FULL, resume: true }),
    envelope('chunkBatch', { jobId, seq, chunks: [goodChunk(v, 2), goodChunk(v, 3)] }),
    envelope('endVolume', { jobId, nextIndex: chunkCountOf(v), expectedRoot: expectedRootOf(v) }),
    envelope('jobProgress', { jobId, chunksDone: 1, chunksTotal: 11, bytesSent: 1, phase: 'reading' }),
    envelope('error', { jobId, code: 'E_SNAPSHOT', message: 'not my job' }),
    envelope('jobResult', { jobId, ok: false, imageId: '', errorCode: 'E_CANCELLED', errorMessage: 'not my job' }),
  ];
}

async function expectUnknownJob(a: ScriptedAgent, jobId: string, frames: number): Promise<void> {
  for (let i = 0; i < frames; i++) expect(await a.next('error', jobId)).toMatchObject({ jobId, code: 'E_UNKNOWN_JOB' });
  await a.ping(); // the connection stays up
}

beforeAll(async () => {
  h = await startAppliance(['db1', 'db2'], { resumeGraceMs: 300, flushEveryBytes: 1 << 30 });
  db2 = await login('db2');
});

afterEach(async () => {
  // db2 lives across tests: it is the bystander every case must leave working.
  await Promise.all(agents.splice(0).filter((a) => a !== db2).map((a) => a.close()));
  agents.push(db2);
  expect(h.app.router.activeJobs().map((j) => j.id), 'no job left running').toEqual([]);
});

afterAll(async () => {
  await db2?.close();
  await h?.close();
});

describe('job ids', () => {
  it('frames for an unknown job id: E_UNKNOWN_JOB each, nothing created, the connection goes on', async () => {
    const a = await login('db1');
    const v = vol();
    for (const f of jobFrames('job-nope', v, 1)) await a.send(f);
    await expectUnknownJob(a, 'job-nope', 6);
    expect(h.app.catalog.job('job-nope')).toBeUndefined();
    await goodBackup(a, 'db1', v);
    await othersKeepWorking();
  });

  it('frames for a job that already ended: E_UNKNOWN_JOB, its image and row unchanged', async () => {
    const a = await login('db1');
    const v = vol();
    const { job, image } = await goodBackup(a, 'db1', v);
    const row = h.app.catalog.job(job.id);
    for (const f of jobFrames(job.id, mutateVolume(v, [2, 3]), 2)) await a.send(f);
    await expectUnknownJob(a, job.id, 6);
    expect(h.app.catalog.job(job.id)).toEqual(row);
    expect((await imageBytes(h, image.id)).equals(v.data)).toBe(true);
  });

  it('db2 sending frames for db1\'s job: E_UNKNOWN_JOB to db2, db1\'s job untouched and completes with db1\'s data', async () => {
    const a = await login('db1');
    const v = vol();
    const job = await transferring(a, 'db1', v);
    // Well-formed chunks of other data at the next seq: had they been taken, db1's own seq 2 would be dropped as a resend.
    for (const f of jobFrames(job.id, mutateVolume(v, [2, 3]), 2)) await db2.send(f);
    await expectUnknownJob(db2, job.id, 6);
    expect(a.inbox.filter((e) => e.kind === 'error'), 'db1 heard nothing of it').toEqual([]);
    await a.batch(job.id, [2, 3, 5, 6, 7, 8, 9, 10].map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);
    await a.end(job.id, chunkCountOf(v), v);
    const { imageId } = await a.next('committed', job.id);
    await a.result(job.id, true, imageId);
    expect(await job.done).toMatchObject({ ok: true, imageId });
    expect((await imageBytes(h, imageId)).equals(v.data)).toBe(true);
    await othersKeepWorking();
  });

  it('db2 sending a malformed frame for db1\'s job: db2 is refused, db1\'s job completes', async () => {
    const a = await login('db1');
    const v = vol();
    const job = await transferring(a, 'db1', v);
    await db2.send(envelope('chunkBatch', { jobId: job.id, seq: 2, chunks: [{ ...goodChunk(v, 2), zero: true }] }));
    expect(await db2.next('error')).toMatchObject({ jobId: '', code: 'E_BAD_CHUNK' });
    expect(await db2.closed).toMatchObject({ code: 1008 });
    await a.batch(job.id, [2, 3, 5, 6, 7, 8, 9, 10].map((i) => goodChunk(v, i)));
    await a.next('ack', job.id);
    await a.end(job.id, chunkCountOf(v), v);
    const { imageId } = await a.next('committed', job.id);
    await a.result(job.id, true, imageId);
    expect(await job.done).toMatchObject({ ok: true, imageId });
    expect((await imageBytes(h, imageId)).equals(v.data)).toBe(true);
    await othersKeepWorking();
  });
});

describe('basis', () => {
  it('only the volume\'s last image is accepted; any other basis turns the job into a full that works', async () => {
    const a = await login('db1');
    let v = vol('basisvol');
    const first = await goodBackup(a, 'db1', v, { basisImageId: 'img-20000101t000000z-00000000' });
    expect(first.ready).toMatchObject({ basisAccepted: false, reason: expect.stringMatching(/no image yet/) });
    expect(first.image).toMatchObject({ kind: 'full', basisImageId: null });

    v = mutateVolume(v, [1]);
    const second = await goodBackup(a, 'db1', v);
    v = mutateVolume(v, [2]);
    const stale = await goodBackup(a, 'db1', v, { basisImageId: first.image.id, changed: [2] });
    expect(stale.ready).toMatchObject({ basisAccepted: false, reason: expect.stringContaining(`not the last image ${second.image.id}`) });
    expect(stale.image).toMatchObject({ kind: 'full', basisImageId: null });

    const unknown = await goodBackup(a, 'db1', v, { basisImageId: 'img-20990101t000000z-deadbeef', changed: [] });
    expect(unknown.ready).toMatchObject({ basisAccepted: false, reason: expect.stringMatching(/not the last image/) });
    expect(unknown.image.kind).toBe('full');

    // The positive control: the last image is accepted and only changed chunks travel.
    const last = unknown.image.id;
    const next = mutateVolume(v, [3]);
    plainOf(next, 5).fill(0);
    const inc = await goodBackup(a, 'db1', next, { basisImageId: last, changed: [3, 5] });
    expect(inc.ready).toMatchObject({ basisAccepted: true, reason: '' });
    expect(inc.image).toMatchObject({ kind: 'incremental', basisImageId: last });
    expect(h.app.catalog.job(inc.job.id)!.stats).toMatchObject({ chunksReceived: 2 });

    // Same id, but the volume grew: the basis no longer fits.
    const grown = { ...makeVolume('basisvol', SIZE + CS, CS), data: Buffer.concat([next.data, Buffer.alloc(CS, 7)]) };
    const resized = await goodBackup(a, 'db1', grown, { basisImageId: inc.image.id, changed: [11] });
    expect(resized.ready).toMatchObject({ basisAccepted: false, reason: expect.stringMatching(/size/) });
    expect(resized.image.kind).toBe('full');
    await othersKeepWorking();
  });
});

describe('failed jobs and results', () => {
  it('a failed job does not block its volume; a running one does (E_BUSY)', async () => {
    const a = await login('db1');
    const v = vol();
    const job = await transferring(a, 'db1', v);
    expect(() => h.app.router.startJob('db1', 'pgdata', 'full')).toThrow(expect.objectContaining({ code: 'E_BUSY' }));
    await a.send(envelope('error', { jobId: job.id, code: 'E_SNAPSHOT', message: 'snapshot vanished' }));
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_SNAPSHOT' });
    await job.chain;
    expect(await jobTrace(h, job.id)).toMatchObject({ row: { state: 'failed', errorCode: 'E_SNAPSHOT' }, images: [], manifests: [], tmp: [] });
    await goodBackup(a, 'db1', v);
  });

  it('JobResult ok=false from the agent fails the job with the agent\'s code', async () => {
    const a = await login('db1');
    const job = await transferring(a, 'db1', vol());
    await a.result(job.id, false, '', 'E_DEVICE');
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_DEVICE' });
    await job.chain;
    expect(await jobTrace(h, job.id)).toMatchObject({ row: { state: 'failed', errorCode: 'E_DEVICE' }, images: [], manifests: [], tmp: [] });
    await goodBackup(a, 'db1', vol());
  });

  it.each([
    ['right after RunJob', false, () => 'img-20990101t000000z-deadbeef'],
    ['mid-transfer, with an invented image id', true, () => 'img-20990101t000000z-deadbeef'],
    ['mid-transfer, naming an image the volume really has', true, () => h.app.catalog.listImages({ agent: 'db1', volume: 'pgdata' }).at(-1)!.id],
  ])('JobResult ok=true without a commit (%s): E_PROTOCOL, no image', async (_n, begun, claimed) => {
    const a = await login('db1');
    const v = vol();
    await goodBackup(a, 'db1', v);
    const images = h.app.catalog.listImages().map((i) => i.id);
    const job = begun ? await transferring(a, 'db1', vol()) : await start(a, 'db1', 'pgdata');
    await a.result(job.id, true, claimed());
    expect(await a.next('error', job.id)).toMatchObject({ code: 'E_PROTOCOL' });
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_PROTOCOL' });
    await job.chain;
    expect(await jobTrace(h, job.id)).toMatchObject({ row: { state: 'failed', imageId: null }, images: [], manifests: [], tmp: [] });
    expect(h.app.catalog.listImages().map((i) => i.id)).toEqual(images);
    await goodBackup(a, 'db1', v);
    await othersKeepWorking();
  });
});

describe('a connection the appliance refuses while it carries a job', () => {
  // Regression: refuse() used to mark the session closed before the socket
  // closed, so the job got no resume grace timer and the volume stayed busy.
  it.each([
    ['a second Hello', (a: ScriptedAgent) => a.sendHello('db1', h.tokens.db1!, [vol()])],
    ['a message only the appliance may send', (a: ScriptedAgent) => a.send(envelope('runJob', { jobId: 'job-x', volume: 'pgdata', mode: JobMode.FULL, audit: false }))],
  ])(`%s: the job ends after the resume grace, nothing visible, the volume is free `, async (_n, offend) => {
    const a = await login('db1');
    const job = await transferring(a, 'db1', vol());
    try {
      await offend(a);
      expect(await a.next('error')).toMatchObject({ jobId: '', code: 'E_PROTOCOL' });
      expect(await a.closed).toMatchObject({ code: 1008 });
      const outcome = await Promise.race([job.done, new Promise((r) => setTimeout(() => r('still running'), 1500))]);
      expect(outcome).toMatchObject({ ok: false, errorCode: 'E_DISCONNECTED' });
      await job.chain;
      expect(await jobTrace(h, job.id)).toMatchObject({ row: { state: 'failed' }, images: [], manifests: [], tmp: [] });
      expect(h.app.router.connectedAgents().map((c) => c.agent)).not.toContain('db1');
      const b = await login('db1');
      await goodBackup(b, 'db1', vol());
      await othersKeepWorking();
    } finally {
      // If the job were stuck (the old bug), end it so later tests find the volume free.
      if (!job.finished) h.app.router.cancelJob(job.id, 'test cleanup');
      await job.chain;
    }
  });
});
