import { execa } from 'execa';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite } from '../support/volume-writes.js';
import { listInstances, parseInstanceName, tracefsRoot } from '../../agent/cbt/tracefs/tracefs-instance.js';
import { agentCli, applianceCmd, type ApplianceProcess, type Daemon } from '../../scripts/lab/processes.js';
import { envelope } from '../../proto/messages.js';
import { WsTransportServer } from '../../proto/ws-transport.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * The daemons as real processes (dist/: `npm run build`) on a real volume
 * (loop device, XFS reflink pool, tracefs tracking): SIGHUP is logged and
 * changes nothing, SIGTERM stops cleanly (exit 0, no tracing instance, no
 * snapshot, no socket; the next incremental uses the tracker), and the
 * agent's failures: a missing image or an unknown config key exit 2 at
 * once, a failed handshake closes its socket.
 */
describe('daemon signals and agent failures', () => {
  let lab: VolumeLab;
  let appl: ApplianceProcess;
  let dataDir: string;
  let stateDir: string;
  let configFile: string;
  let agentLog: string;
  let applianceLog: string;
  let token: string;
  /** Every daemon started, in order (the tests look up the current agent here); each is also a release of `fx`. */
  const daemons: Daemon[] = [];
  const fx = e2eFixture();

  beforeAll(async () => {
    expect(existsSync(agentCli()), `${agentCli()} missing: run npm run build`).toBe(true);
    lab = await fx.lab({ volumeSize: 128 << 20, name: 'vol' });
    dataDir = join(lab.root, 'appliance');
    applianceLog = join(lab.root, 'appliance.log');
    appl = await fx.applianceProcess(dataDir, { logFile: applianceLog, args: ['--audit-every', '0'] });
    daemons.push(appl);
    const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
    expect(add.exitCode, add.stderr).toBe(0);
    token = add.json.token;
    stateDir = join(lab.root, 'agent-state');
    await mkdir(stateDir, { recursive: true });
    configFile = join(lab.root, 'agent.json');
    agentLog = join(lab.root, 'agent.log');
    await writeFile(configFile, JSON.stringify({ appliance: appl.url, agent: 'db1', token, stateDir, volumes: [lab.volume], reconnectMaxMs: 1000 }));
  });

  afterAll(() => fx.dispose());

  async function startAgent(): Promise<Daemon> {
    const a = fx.agentProcess(configFile, agentLog, { BLOCKSNAP_LOG: 'info' });
    daemons.push(a);
    const tail = async () => `agent log:\n${(await readFile(agentLog, 'utf8').catch(() => '')).slice(-3000)}\nappliance log:\n${(await readFile(applianceLog, 'utf8').catch(() => '')).slice(-2000)}`;
    // This process's own log line: `agents list` may still show the previous process's session.
    const connected = new RegExp(`"pid":${a.pid},[^\\n]*"msg":"connected to appliance"`);
    await waitFor('agent connected', async () => {
      if (a.child.exitCode !== null) throw new Error(`agent exited ${a.child.exitCode}: ${await tail()}`);
      return connected.test(await readFile(agentLog, 'utf8').catch(() => ''));
    }, { timeoutMs: 30_000, everyMs: 100, detail: tail });
    return a;
  }

  async function backup(...flags: string[]): Promise<string> {
    const r = await applianceCmd(dataDir, ['backup', 'db1', 'vol', ...flags]);
    expect(r.exitCode, r.stdout + r.stderr).toBe(0);
    return r.stdout;
  }

  /**
   * Runs fn with the volume's filesystem frozen: while no agent runs, even a
   * journal commit would be a write while untracked (a correct reason to
   * distrust the tracker, not what these tests are about).
   */
  async function whileFrozen<T>(fn: () => Promise<T>): Promise<T> {
    await execa('fsfreeze', ['-f', lab.volumeMount]);
    try {
      return await fn();
    } finally {
      await execa('fsfreeze', ['-u', lab.volumeMount]);
    }
  }

  /** What a stopped agent (pid) must not leave: a tracing instance it named, a snapshot, its control socket. */
  async function expectNothingLeftBy(pid: number): Promise<void> {
    const owners = (await listInstances(await tracefsRoot({ mount: false }))).map((n) => parseInstanceName(n)?.pid);
    expect(owners).not.toContain(pid);
    const snapDir = join(lab.poolMount, '.blocksnap');
    const snaps = existsSync(snapDir) ? (await readdir(snapDir)).filter((f) => f.includes('.snap')) : [];
    expect(snaps).toEqual([]);
    expect(existsSync(join(stateDir, 'agent.sock'))).toBe(false);
  }

  it('SIGHUP: both daemons log it and keep running; SIGTERM: the agent exits 0 leaving nothing, the next incremental uses the tracker', async () => {
    let agent = await startAgent();
    expect(await backup('--full')).toMatch(/^ok job-\S+ image \S+$/);

    for (const [d, log] of [[appl, applianceLog], [agent, agentLog]] as const) {
      process.kill(d.pid, 'SIGHUP');
      await waitFor(`SIGHUP logged in ${log}`, async () => /"signal":"SIGHUP"[^\n]*SIGHUP ignored/.test(await readFile(log, 'utf8')), { timeoutMs: 10_000, everyMs: 100 });
      expect(d.child.exitCode).toBe(null);
      expect(d.child.signalCode).toBe(null);
    }
    await ddWrite(join(lab.volumeMount, 'after-hup.bin'), { bs: 1 << 20, count: 2 });
    // One line, no fallback note: the tracker survived the SIGHUP.
    expect(await backup()).toMatch(/^ok job-\S+ image \S+$/);

    await ddWrite(join(lab.volumeMount, 'before-term.bin'), { bs: 1 << 20, count: 2 });
    const pid = agent.pid;
    agent = await whileFrozen(async () => {
      expect(await agent.stop()).toBe(0);
      expect(await readFile(agentLog, 'utf8')).toMatch(/"signal":"SIGTERM"[^\n]*stop requested/);
      await expectNothingLeftBy(pid);
      return startAgent();
    });
    const human = await backup();
    expect(human, 'a clean SIGTERM keeps the tracker valid').toMatch(/^ok job-\S+ image \S+$/);
    const jobs = await applianceCmd(dataDir, ['jobs', 'list', '--limit', '1', '--json']);
    expect(jobs.exitCode, jobs.stderr).toBe(0);
    expect(jobs.json[0].stats).toMatchObject({ changeSource: 'tracker', fallbackReason: '' });
    expect(Number(jobs.json[0].stats.chunksSent)).toBeGreaterThanOrEqual(32); // the 2 MiB written before the stop
  });

  it('after kill -9 the human backup line says the incremental fell back, and why', async () => {
    const agent = daemons.filter((d) => d !== appl).at(-1)!;
    await agent.kill9();
    await ddWrite(join(lab.volumeMount, 'after-kill.bin'), { bs: 1 << 20, count: 1 });
    await startAgent();
    const human = await backup();
    expect(human).toMatch(/^ok job-\S+ image \S+\nincremental fell back to digest-compare \(not the tracker\): tracker: agent did not shut down cleanly/);
  });

  it('SIGTERM during a backup: the job is cancelled, the agent exits 0 leaving nothing, the next incremental uses the tracker', async () => {
    const [current] = daemons.filter((x) => x !== appl && x.child.exitCode === null && x.child.signalCode === null);
    const config = JSON.parse(await readFile(configFile, 'utf8'));
    const agent = await whileFrozen(async () => {
      expect(await current!.stop()).toBe(0);
      // zstd level 22 on random data: a few MB/s, a wide window to signal in.
      await writeFile(configFile, JSON.stringify({ ...config, compressionLevel: 22, workers: 1 }));
      return startAgent();
    });
    await ddWrite(join(lab.volumeMount, 'mid-job.bin'), { bs: 1 << 20, count: 48 });
    const job = applianceCmd(dataDir, ['backup', 'db1', 'vol', '--json']);
    // A complete .snap exists once the snapshot is taken and the volume thawed: the transfer is on.
    const snapDir = join(lab.poolMount, '.blocksnap');
    await waitFor('snapshot taken', async () => existsSync(snapDir) && (await readdir(snapDir)).some((f) => f.endsWith('.snap')), { timeoutMs: 60_000, everyMs: 100 });
    await whileFrozen(async () => {
      expect(await agent.stop()).toBe(0);
      const r = await job;
      expect(r.exitCode).toBe(1);
      expect(r.json).toMatchObject({ ok: false });
      await expectNothingLeftBy(agent.pid);
      await writeFile(configFile, JSON.stringify(config));
      await startAgent();
    });
    await backup();
    const jobs = await applianceCmd(dataDir, ['jobs', 'list', '--limit', '1', '--json']);
    expect(jobs.exitCode, jobs.stderr).toBe(0);
    expect(jobs.json[0].stats).toMatchObject({ changeSource: 'tracker', fallbackReason: '' });
    expect(Number(jobs.json[0].stats.chunksSent)).toBeGreaterThanOrEqual(48 * 16); // the cancelled job's changes travel now
  });

  it('SIGTERM: the appliance exits 0 and releases its data directory', async () => {
    const running = daemons.filter((x) => x !== appl && x.child.exitCode === null && x.child.signalCode === null);
    expect(running).toHaveLength(1);
    for (const d of running) expect(await d.stop()).toBe(0);
    expect(await appl.stop()).toBe(0);
    expect(await readFile(applianceLog, 'utf8')).toMatch(/"signal":"SIGTERM"[^\n]*"msg":"stopped"/);
    // No pid file or control socket left; whatever lock it held is free: another appliance starts on the directory at once.
    expect((await readdir(dataDir)).filter((f) => /\.pid$|\.sock$/.test(f))).toEqual([]);
    const next = await fx.applianceProcess(dataDir, { logFile: applianceLog });
    expect(await next.stop()).toBe(0);
  });

  it('an agent whose volume image is missing exits 2 at once with a configuration error, without dialling', async () => {
    const dialled: number[] = [];
    const srv = await WsTransportServer.listen({ port: 0 }, () => dialled.push(Date.now()));
    try {
      const file = join(lab.root, 'missing-image.json');
      const log = join(lab.root, 'missing-image.log');
      const badState = join(lab.root, 'state-missing');
      await mkdir(badState, { recursive: true });
      await writeFile(file, JSON.stringify({
        appliance: srv.url, agent: 'db1', token: 't', stateDir: badState, tracking: 'off',
        volumes: [{ ...lab.volume, image: join(lab.poolMount, 'no-such.img') }],
      }));
      const started = Date.now();
      const a = fx.agentProcess(file, log);
      daemons.push(a);
      const code = await Promise.race([a.exited, sleep(30_000).then(() => 'still running')]);
      expect(code, await readFile(log, 'utf8')).toBe(2);
      expect(Date.now() - started).toBeLessThan(30_000);
      const text = await readFile(log, 'utf8');
      expect(text).toMatch(/E_CONFIG: volume vol: image \S*no-such\.img: ENOENT/);
      expect(text).not.toMatch(/cannot reach appliance/);
      expect(dialled).toEqual([]);
    } finally {
      await srv.close();
    }
  });

  it('an agent config with unknown keys exits 2 naming each by its path', async () => {
    const file = join(lab.root, 'typo.json');
    await writeFile(file, JSON.stringify({
      appliance: 'ws://127.0.0.1:1/v1/agent', agent: 'db1', token: 't', stateDir, volumes: [lab.volume], volumez: [], postgres: { prot: 5432 },
    }));
    const log = join(lab.root, 'typo.log');
    const a = fx.agentProcess(file, log);
    daemons.push(a);
    expect(await Promise.race([a.exited, sleep(30_000).then(() => 'still running')])).toBe(2);
    const text = await readFile(log, 'utf8');
    expect(text).toContain(`${file}: volumez: unrecognized key`);
    expect(text).toContain(`${file}: postgres.prot: unrecognized key`);
  });

  it('a handshake the appliance refuses closes the agent\'s socket at once', async () => {
    let closedAt = 0;
    let refusedAt = 0;
    const srv = await WsTransportServer.listen({ port: 0 }, (t) => {
      t.onClose(() => (closedAt = Date.now()));
      t.onMessage(() => {
        refusedAt = Date.now();
        void t.send(envelope('error', { jobId: '', code: 'E_AUTH', message: 'refused by the test' })).catch(() => undefined);
      });
    });
    const log = pino({ level: 'silent' });
    const handshakeState = join(lab.root, 'state-handshake');
    await mkdir(handshakeState, { recursive: true });
    const config = parseAgentConfig({ appliance: srv.url, agent: 'db1', token: 't', stateDir: handshakeState, volumes: [lab.volume], tracking: 'off' });
    let fatal = '';
    const agent = await composeAgent(config, log, { hooks: { onFatal: (e) => (fatal = e.code) } });
    try {
      await agent.start();
      await waitFor('agent refused', async () => fatal !== '', { timeoutMs: 10_000 });
      expect(fatal).toBe('E_AUTH');
      // The agent has not been stopped: only its own close ends the connection (the appliance would wait 10 s).
      await waitFor('socket closed by the agent', async () => closedAt > 0, { timeoutMs: 3_000 });
      expect(closedAt - refusedAt).toBeLessThan(3_000);
    } finally {
      await agent.stop();
      await srv.close();
    }
  });
});

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
