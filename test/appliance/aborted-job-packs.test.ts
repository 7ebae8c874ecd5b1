import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceCli, applianceCmd, spawnAppliance, type ApplianceProcess } from '../../scripts/lab/processes.js';
import { chunkCountOf, goodChunk, imageBytes, makeVolume, ScriptedAgent, sha256, plainOf, type TestVolume } from '../../appliance/testing/scripted-agent.js';

/**
 * The packs of a job that never commits do not stay forever (DESIGN.md §5):
 * they are removed when the job aborts, and at the next start after a
 * kill -9 mid-ingest; a pack holding a blob that a committed image of
 * another job de-duplicated against is never removed.
 */
async function packFiles(dataDir: string): Promise<Set<string>> {
  const out = new Set<string>();
  const dir = join(dataDir, 'store', 'packs');
  if (!existsSync(dir)) return out;
  for (const hh of await readdir(dir)) for (const f of await readdir(join(dir, hh))) if (f.endsWith('.pack')) out.add(f.slice(0, -5));
  return out;
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Volumes a and b: b's chunk 0 is a's chunk 0 (de-duplicated across the two jobs). */
function volumes(): { a: TestVolume; b: TestVolume } {
  const a = makeVolume('a', 12 * 65536, 65536);
  const b = makeVolume('b', 12 * 65536, 65536);
  plainOf(a, 0).copy(plainOf(b, 0));
  return { a, b };
}

describe('packs of aborted jobs', () => {
  let root: string;
  const harnesses: ApplianceHarness[] = [];
  const procs = new Set<ApplianceProcess>();

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'bsn-abort-'));
  });
  afterEach(async () => {
    await Promise.allSettled(harnesses.splice(0).map((h) => h.close({ keepData: true })));
    await Promise.allSettled([...procs].map((p) => p.stop()));
    procs.clear();
  });
  afterAll(async () => {
    if (root) await rm(root, { recursive: true, force: true });
  });

  it('are removed when the job aborts, except one another committed job de-duplicated against; a restart keeps that one', async () => {
    const dataDir = join(root, 'abort');
    // Flush after every batch: each batch of job A becomes its own durable pack.
    let h = await startAppliance(['db1'], { dataDir, flushEveryBytes: 1 });
    harnesses.push(h);
    const { a, b } = volumes();
    const agent = await ScriptedAgent.connect(h.url);
    await agent.login('db1', h.tokens.db1!, [a, b]);

    const jobA = h.app.router.startJob('db1', 'a', 'full');
    await agent.begin(jobA.id, a);
    await agent.next('volumeReady', jobA.id);
    await agent.batch(jobA.id, [goodChunk(a, 0), goodChunk(a, 1)]);
    await agent.next('ack', jobA.id);
    const shared = await packFiles(dataDir); // the pack holding a's chunk 0 = b's chunk 0
    expect(shared.size).toBe(1);
    await agent.batch(jobA.id, [goodChunk(a, 2), goodChunk(a, 3)]);
    await agent.next('ack', jobA.id);
    const onlyA = [...(await packFiles(dataDir))].filter((p) => !shared.has(p));
    expect(onlyA).toHaveLength(1);

    // Job B commits while A runs; its chunk 0 is found in A's durable pack.
    const jobB = h.app.router.startJob('db1', 'b', 'full');
    await agent.transfer(jobB.id, b);
    const outB = await jobB.done;
    expect(outB.ok).toBe(true);
    expect(outB.stats?.chunksStored).toBe(chunkCountOf(b) - 1);

    await agent.result(jobA.id, false, '', 'E_DEVICE');
    expect((await jobA.done).ok).toBe(false);
    await until('the aborted job\'s own pack to go', async () => !(await packFiles(dataDir)).has(onlyA[0]!));
    const after = await packFiles(dataDir);
    expect(after.has([...shared][0]!)).toBe(true);
    expect(h.app.store.has(sha256(plainOf(a, 2)))).toBe(false);
    expect(h.app.store.has(sha256(plainOf(a, 0)))).toBe(true);
    expect((await imageBytes(h, outB.imageId!)).equals(b.data)).toBe(true);
    await agent.close();

    await h.close({ keepData: true });
    harnesses.pop();
    h = await startAppliance(['db1'], { dataDir });
    harnesses.push(h);
    expect(await packFiles(dataDir)).toEqual(after);
    expect((await imageBytes(h, outB.imageId!)).equals(b.data)).toBe(true);
  });

  it('are removed at abort also when the map was already sealed: a root refused by the end-to-end check, a set that never commits', async () => {
    const dataDir = join(root, 'sealed');
    const h = await startAppliance(['db1'], { dataDir });
    harnesses.push(h);
    const { a, b } = volumes();
    const agent = await ScriptedAgent.connect(h.url);
    await agent.sendHello('db1', h.tokens.db1!, [a, b], { groups: [{ name: 'g', volumes: ['a', 'b'] }] });
    await agent.next('welcome');
    const before = await packFiles(dataDir);

    // The group's first member ends (its map is sealed: chunks, pages and root durable), then
    // CommitSet comes before the second member ended: E_PROTOCOL, the set never commits.
    const job = h.app.router.startJob('db1', 'g', 'full');
    await agent.next('runJob', job.id);
    await agent.begin(job.id, a);
    await agent.next('volumeReady', job.id);
    await agent.batch(job.id, Array.from({ length: chunkCountOf(a) }, (_, i) => goodChunk(a, i)));
    await agent.next('ack', job.id);
    await agent.end(job.id, chunkCountOf(a), a);
    await until('member a to end', async () => (await packFiles(dataDir)).size > before.size);
    await agent.send({ kind: 'commitSet', commitSet: { jobId: job.id } } as never);
    expect(await job.done).toMatchObject({ ok: false, errorCode: 'E_PROTOCOL' });
    await job.chain;
    // Before: the sealed member's packs stayed until the next start.
    expect(await packFiles(dataDir)).toEqual(before);
    expect(h.app.store.has(sha256(plainOf(a, 1)))).toBe(false);

    // The same for a member refused by the root check (E_INTEGRITY is raised after the map is sealed).
    const job2 = h.app.router.startJob('db1', 'g', 'full');
    await agent.next('runJob', job2.id);
    await agent.begin(job2.id, a);
    await agent.next('volumeReady', job2.id);
    await agent.batch(job2.id, Array.from({ length: chunkCountOf(a) }, (_, i) => goodChunk(a, i)));
    await agent.next('ack', job2.id);
    await agent.end(job2.id, chunkCountOf(a), b);
    expect(await job2.done).toMatchObject({ ok: false, errorCode: 'E_INTEGRITY' });
    await job2.chain;
    expect(await packFiles(dataDir)).toEqual(before);
    await agent.close();
  });

  it('are removed at the next start after kill -9 mid-ingest, except one a committed image de-duplicated against', async () => {
    expect(existsSync(applianceCli()), 'run npm run build first').toBe(true);
    const dataDir = join(root, 'kill9');
    await mkdir(dataDir);
    const token = (await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json'])).json.token as string;
    let appl = await spawnAppliance(dataDir, { logFile: `${dataDir}.log` });
    procs.add(appl);
    const { a, b } = volumes();
    let agent = await ScriptedAgent.connect(appl.url);
    await agent.login('db1', token, [a, b]);

    const backupA = applianceCmd(dataDir, ['backup', 'db1', 'a', '--full', '--json']);
    const runA = await agent.next('runJob', undefined, 10_000);
    await agent.begin(runA.jobId, a);
    await agent.next('volumeReady', runA.jobId);
    await agent.batch(runA.jobId, [goodChunk(a, 0), goodChunk(a, 1)]);
    await agent.next('ack', runA.jobId);
    // A dropped connection makes the appliance flush A's open pack: durable, uncommitted.
    await agent.close();
    const shared = await until('job A\'s first pack to become durable', async () => {
      const p = await packFiles(dataDir);
      return p.size > 0 && p;
    });
    // The same agent process resumes A, sends more, and drops again: a second durable pack of A.
    agent = await ScriptedAgent.connect(appl.url, agent.instanceId);
    await agent.login('db1', token, [a, b]);
    await agent.begin(runA.jobId, a, { resume: true });
    expect((await agent.next('volumeReady', runA.jobId)).resumeFrom).toBe(2);
    await agent.batch(runA.jobId, [goodChunk(a, 2), goodChunk(a, 3), goodChunk(a, 4)], 100);
    await agent.next('ack', runA.jobId);
    await agent.close();
    const packsOfA = await until('job A\'s second pack to become durable', async () => {
      const p = await packFiles(dataDir);
      return p.size > 1 && p;
    });
    agent = await ScriptedAgent.connect(appl.url, agent.instanceId); // A waits for a resume that never comes
    await agent.login('db1', token, [a, b]);
    const backupB = applianceCmd(dataDir, ['backup', 'db1', 'b', '--full', '--json']);
    const runB = await agent.next('runJob', undefined, 10_000);
    expect(runB.volume).toBe('b');
    await agent.transfer(runB.jobId, b);
    expect((await backupB).json).toMatchObject({ ok: true });
    const packsOfB = [...(await packFiles(dataDir))].filter((p) => !packsOfA.has(p));

    await appl.kill9();
    procs.delete(appl);
    await agent.close();
    await backupA; // the CLI sees the appliance go away
    expect((await packFiles(dataDir)).size).toBe(packsOfA.size + packsOfB.length);

    appl = await spawnAppliance(dataDir, { logFile: `${dataDir}.log` });
    procs.add(appl);
    const left = await packFiles(dataDir);
    // A's first pack survives because B's committed image reads its chunk 0 from it; A's second goes.
    expect(packsOfA.size).toBe(2);
    expect(left).toEqual(new Set([...shared, ...packsOfB]));
    const log = await readFile(`${dataDir}.log`, 'utf8');
    expect(log).toMatch(/recovered from previous run/);
    const out = join(root, 'b.raw');
    const ex = await applianceCmd(dataDir, ['export', (await backupB).json.imageId, '--to', out, '--json']);
    expect(ex.exitCode, ex.stderr).toBe(0);
    expect((await readFile(out)).equals(b.data)).toBe(true);
    const v = await applianceCmd(dataDir, ['verify', '--json']);
    expect(v.exitCode, v.stdout).toBe(0);
  });
});
