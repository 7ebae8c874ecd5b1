import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareExportWithSnapshot } from '../support/export-compare.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { pgbenchTimed } from '../../scripts/lab/pgbench-timed.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite } from '../support/volume-writes.js';
import { listInstances, parseInstanceName, tracefsRoot } from '../../agent/cbt/tracefs/tracefs-instance.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { agentCli, type Daemon } from '../../scripts/lab/processes.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * When the tracker cannot vouch for a bitmap, the next job says so and
 * compares digests instead; when it can, it is used. With the agent as a
 * real process (the compiled CLI: `npm run build` first) on a live
 * PostgreSQL volume: kill -9 during pgbench, clean stop + restart with and
 * without writes in between, and lost kernel events from a 4 KiB ring
 * buffer. Every image is compared byte for byte with its snapshot.
 */
type Stats = Record<string, unknown> & { changeSource: string; fallbackReason: string };

describe('tracker recovery: unclean shutdown, restart, lost events', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let pg: PgCluster;
  let appl: ApplianceHarness;
  let retained: string;
  let stateDir: string;
  let configFile: string;
  let logFile: string;
  let agent: Daemon | undefined;
  let session: string | undefined;

  beforeAll(async () => {
    expect(existsSync(agentCli()), `${agentCli()} missing: run npm run build`).toBe(true);
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 3 * 1024 ** 3, name: 'pgdata' });
    pg = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pg.pgbenchInit(5);
    appl = await fx.appliance(['db1'], { auditEvery: 0 });
    retained = join(lab.poolMount, 'retained');
    stateDir = join(lab.root, 'agent-state');
    await mkdir(stateDir, { recursive: true });
    configFile = join(lab.root, 'agent.json');
    logFile = join(lab.root, 'agent.log');
    await startAgent();
  });

  afterAll(() => fx.dispose());

  async function startAgent(extra: Record<string, unknown> = {}): Promise<void> {
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume], retainSnapshotsDir: retained, ...extra,
    }));
    const a = fx.agentProcess(configFile, logFile, { BLOCKSNAP_LOG: 'info' });
    agent = a;
    // A new session, not the one of the process we just replaced.
    const newSession = () => appl.app.router.connectedAgents().find((s) => s.agent === 'db1' && s.session !== session);
    await waitFor('the agent to connect (or exit)', () => newSession() !== undefined || a.child.exitCode !== null, { timeoutMs: 15_000, everyMs: 100 }).catch(() => undefined);
    const s = newSession();
    if (s) {
      session = s.session;
      return;
    }
    throw new Error(`agent did not connect; log:\n${(await readFile(logFile, 'utf8').catch(() => '')).slice(-3000)}`);
  }

  async function stopAgentCleanly(): Promise<void> {
    // SIGTERM: the agent saves its bitmap with the clean-shutdown flag and exits 0.
    expect(await agent!.stop()).toBe(0);
  }

  async function backup(mode: 'full' | 'incremental', audit = false): Promise<Stats> {
    const job = appl.app.router.startJob('db1', 'pgdata', mode, { audit });
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const img = appl.app.catalog.image(outcome.imageId!)!;
    const snap = join(retained, `pgdata_${job.id}.img`);
    const cmp = await compareExportWithSnapshot(appl.app.store, img.rootDigest, snap, lab.poolMount);
    expect(cmp.identical, `export of ${img.id} differs from its snapshot: ${cmp.detail}`).toBe(true);
    await rm(snap, { force: true });
    return appl.app.catalog.job(job.id)!.stats as Stats;
  }

  async function agentLog(): Promise<string> {
    return readFile(logFile, 'utf8').catch(() => '');
  }

  it('kill -9 during pgbench: the next job says the bitmap is invalid and compares digests; the one after uses the tracker', async () => {
    expect((await backup('full')).changeSource).toBe('full');

    let benchDone = false;
    const committed = async () => Number((await pg.query<{ n: string }>('select count(*)::text as n from pgbench_history'))[0]!.n);
    const before = await committed();
    const bench = pgbenchTimed(pg, { seconds: 4, clients: 2 }).finally(() => (benchDone = true));
    // Killed while pgbench writes: once its transactions are landing (each adds a pgbench_history row).
    await waitFor('pgbench to commit transactions', async () => benchDone || (await committed()) >= before + 50, { timeoutMs: 3_000, everyMs: 50 });
    expect(benchDone, 'pgbench must still be running when the agent is killed').toBe(false);
    const killedPid = agent!.pid;
    await agent!.kill9();
    expect(benchDone).toBe(false);
    expect((await bench).transactions).toBeGreaterThan(0);

    await startAgent();
    // The restart swept the tracing instance the killed process left.
    const owners = (await listInstances(await tracefsRoot({ mount: false }))).map((n) => parseInstanceName(n)!.pid);
    expect(owners).not.toContain(killedPid);

    const after = await backup('incremental');
    expect(after.changeSource).toBe('digest-compare');
    expect(after.fallbackReason).toMatch(/^tracker: agent did not shut down cleanly/);
    expect(after.chunksSent).toBeGreaterThan(0);

    await pg.pgbench({ transactions: 200, clients: 2 });
    const next = await backup('incremental');
    expect(next.fallbackReason).toBe('');
    expect(next.changeSource).toBe('tracker');
    expect(next.chunksSent).toBeGreaterThan(0);
    expect(next.chunksRead).toBeLessThan(Number(next.chunksTotal) / 4);
  });

  it('clean stop + restart without writes in between: the saved bitmap is trusted', async () => {
    // Stop PostgreSQL so nothing writes while the agent is down; its shutdown
    // checkpoint is a change the resumed bitmap must carry.
    await pg.stop();
    await ddWrite(join(lab.volumeMount, 'before-stop.bin'), { bs: 1 << 20, count: 4 });
    await stopAgentCleanly();
    await startAgent();
    const st = await backup('incremental');
    expect(st.fallbackReason).toBe('');
    expect(st.changeSource).toBe('tracker');
    // The writes made before the stop travel, read from the resumed bitmap alone.
    expect(st.chunksSent).toBeGreaterThanOrEqual(64);
  });

  it('clean stop + writes while the agent is down + restart: invalid, digest comparison, identical image', async () => {
    await stopAgentCleanly();
    await ddWrite(join(lab.volumeMount, 'while-down.bin'), { bs: 1 << 20, count: 8 });
    await startAgent();
    const st = await backup('incremental');
    expect(st.changeSource).toBe('digest-compare');
    expect(st.fallbackReason).toMatch(/^tracker: device written while untracked/);
    expect(st.chunksSent).toBeGreaterThanOrEqual(128);
  });

  it('lost events from a 4 KiB ring buffer (config trackerBufferKb): invalid, digest comparison, identical image', async () => {
    await stopAgentCleanly();
    const logBefore = (await agentLog()).length;
    await startAgent({ trackerBufferKb: 4 });
    // Files allocated first, then overwritten in place by two O_DIRECT writers at once.
    const files = [join(lab.volumeMount, 'burst-a.bin'), join(lab.volumeMount, 'burst-b.bin')];
    const lost = async () => /"msg":"change tracking invalid"[^\n]*lost|lost[^\n]*"msg":"change tracking invalid"/.test((await agentLog()).slice(logBefore));
    // The agent is held stopped (SIGSTOP) during each burst: its trace_pipe
    // reader cannot drain the buffer, so the overrun does not depend on how
    // fast this machine lets the reader keep up (on a quiet machine it did,
    // and no event was lost). A stalled agent is what the loss check is for.
    const pid = agent!.pid;
    for (let round = 0; round < 5 && !(await lost()); round++) {
      process.kill(pid, 'SIGSTOP');
      try {
        await Promise.all(files.map((f) => ddWrite(f, { bs: 4096, count: 8000, direct: true, noTruncate: true })));
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      // The tracker polls its loss counters every second: give it a poll or two to report this round.
      await waitFor('the tracker to report lost events', lost, { timeoutMs: 2_500, everyMs: 100 }).catch(() => undefined);
    }
    expect(await lost(), 'the burst must overrun the 4 KiB ring buffer').toBe(true);
    const st = await backup('incremental');
    expect(st.changeSource).toBe('digest-compare');
    expect(st.fallbackReason).toMatch(/^tracker: .*lost/);
    expect(st.chunksSent).toBeGreaterThan(0);
  });
});
