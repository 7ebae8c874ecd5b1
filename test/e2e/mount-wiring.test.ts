/**
 * Instant mount wired end to end with a fake LocalMounter (test/support/
 * fake-mounter.ts): the real appliance (in process: NBD served beside the
 * WebSocket), real agents (in process, their control sockets), and the real
 * CLIs from dist/ (`npm run build`): `blocksnap-agent mount|mounts|unmount`
 * and `blocksnap-appliance mount --on|mounts list|show|remove|images show`.
 * The fake proves the grant's URIs are served to the agent (nbdinfo) and
 * fetches the image's WAL through the session; nothing is attached.
 */
import { execa } from 'execa';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { makeVolume, ScriptedAgent } from '../../appliance/testing/scripted-agent.js';
import { MOUNTS_DIR } from '../../appliance/mounts/mount-manager.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceBackends } from '../../appliance/compose.js';
import { Appliance } from '../../appliance/server/appliance.js';
import { createLogger } from '../../proto/shared/log.js';
import { agentCli, applianceCli, applianceCmd } from '../../scripts/lab/processes.js';
import { createServer, type AddressInfo } from 'node:net';
import { FakeMounter } from '../support/fake-mounter.js';
import { backupPgImage, MOUNT_WAL_BYTES, MOUNT_WAL_NAME } from '../support/mount-images.js';
import { testLogger } from '../support/e2e-fixture.js';

describe('instant mount wiring (fake LocalMounter)', () => {
  let h: ApplianceHarness;
  let root: string;
  const agents: Agent[] = [];
  const fakes: Record<string, FakeMounter> = {};
  const config: Record<string, string> = {};
  const v1 = makeVolume('pgdata', 10 * 65536, 65536, [2]);
  const v2 = makeVolume('other', 3 * 65536, 65536);
  let img1: string;
  let img2: string;
  /** The appliance after the restart test reopened the data directory (closed, and the directory removed, at the end). */
  let reopened: Appliance | null = null;

  /** `blocksnap-agent ARGS --config <agent's config>`, parsed when --json. */
  const agentCmd = async (name: string, args: string[]) => {
    const r = await execa(process.execPath, [agentCli(), ...args, '--config', config[name]!], { reject: false, stdin: 'ignore' });
    return { exitCode: r.exitCode, stdout: String(r.stdout), stderr: String(r.stderr), json: args.includes('--json') && r.exitCode === 0 ? JSON.parse(String(r.stdout)) : undefined };
  };

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'bsn-mount-wiring-'));
    h = await startAppliance(['db1', 'db2']);
    // Images of each agent, made by scripted agents under their names (then gone: the real agents take over).
    for (const [name, v] of [['db1', v1], ['db2', v2]] as const) {
      const s = await ScriptedAgent.connect(h.url);
      await s.login(name, h.tokens[name]!, [v]);
      const id = await backupPgImage(s, h, name, v);
      if (name === 'db1') img1 = id;
      else img2 = id;
      await s.close();
    }
    for (const name of ['db1', 'db2']) {
      const stateDir = join(root, name);
      const raw = { appliance: h.url, agent: name, token: h.tokens[name]!, stateDir, volumes: [], tracking: 'off' };
      config[name] = join(root, `${name}.json`);
      await (await import('node:fs/promises')).writeFile(config[name]!, JSON.stringify(raw));
      fakes[name] = new FakeMounter();
      const agent = await composeAgent(parseAgentConfig(raw), testLogger(), { ports: { mounter: fakes[name] } });
      agents.push(agent);
      await agent.start();
      await agent.waitConnected(15_000);
    }
  }, 120_000);
  afterAll(async () => {
    for (const a of agents) await a.stop();
    await h?.close({ keepData: !!reopened });
    if (reopened) {
      await reopened.close();
      await rm(h.dataDir, { recursive: true, force: true });
    }
    if (root) await rm(root, { recursive: true, force: true });
  });

  it('blocksnap-agent mount: the agent gets nbd://HOST:PORT/EXPORT served to it and the image\'s WAL; the appliance shows the mount', async () => {
    expect(fakes.db1!.cleanedAtStart).toBe(1); // orphans of an earlier run are released at every start
    const r = await agentCmd('db1', ['mount', img1, '--port', '5491', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.json).toMatchObject({ imageId: img1, pgPort: 5491, connection: expect.stringContaining('port=5491') });
    expect(r.json.secondsFromCommand).toBeGreaterThan(0);
    const grant = fakes.db1!.grants.at(-1)!;
    expect(grant).toMatchObject({ mountId: r.json.mountId, imageId: img1, writable: true });
    const uri = grant.exports[0]!.uri;
    expect(uri).toMatch(new RegExp(`^nbd://127\\.0\\.0\\.1:${h.app.nbdPort}/[0-9a-f]{32}$`));
    expect(fakes.db1!.sizes.get(uri)).toBe(v1.size);
    expect(fakes.db1!.wal.get(MOUNT_WAL_NAME)?.equals(MOUNT_WAL_BYTES)).toBe(true);

    const listed = await agentCmd('db1', ['mounts', '--json']);
    expect(listed.json.map((m: any) => m.mountId)).toEqual([r.json.mountId]);
    const onAppliance = await applianceCmd(h.dataDir, ['mounts', 'list', '--json']);
    expect(onAppliance.exitCode, onAppliance.stderr).toBe(0);
    expect(onAppliance.json).toEqual([expect.objectContaining({ id: r.json.mountId, imageRef: img1, agent: 'db1', peerAddress: '127.0.0.1', requestedBy: 'agent' })]);
    expect(JSON.stringify(onAppliance.json)).not.toContain(uri.split('/').at(-1)); // export names are secrets: never listed
    const shown = await applianceCmd(h.dataDir, ['mounts', 'show', r.json.mountId]);
    expect(shown.stdout).toContain(`image:       ${img1}`);
    const img = await applianceCmd(h.dataDir, ['images', 'show', img1]);
    expect(img.stdout).toContain(`mounted:     yes (${r.json.mountId})`);

    const un = await agentCmd('db1', ['unmount', r.json.mountId, '--json']);
    expect(un.exitCode, un.stderr).toBe(0);
    expect(fakes.db1!.unmounted).toContain(r.json.mountId);
    // unmount returned after the appliance acknowledged: the mount is ended there, its overlay gone.
    expect(h.app.mounts.mounts.get(r.json.mountId)?.state).toBe('ended');
    expect(await readdir(join(h.dataDir, MOUNTS_DIR))).toEqual([]);
    expect((await applianceCmd(h.dataDir, ['images', 'show', img1])).stdout).toContain('mounted:     no');
    const gone = await execa('nbdinfo', ['--size', uri], { reject: false, timeout: 20_000 });
    expect(gone.exitCode).not.toBe(0);
  }, 60_000);

  it('an agent cannot mount another agent\'s image by itself; the operator can, with blocksnap-appliance mount --on', async () => {
    const refused = await agentCmd('db1', ['mount', img2, '--json']);
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toMatch(/E_NOT_FOUND/);
    expect(h.app.mounts.isMounted(img2)).toBe(false);

    const r = await applianceCmd(h.dataDir, ['mount', img2, '--on', 'db1', '--port', '5492', '--target', '/srv/copy', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    expect(r.json).toMatchObject({ ok: true, pgPort: 5492, target: '/srv/copy', connection: expect.stringContaining('port=5492') });
    expect(r.json.secondsToFirstQuery).toBeGreaterThan(0);
    expect(h.app.mounts.mounts.get(r.json.mountId)).toMatchObject({ agent: 'db1', imageRef: img2, requestedBy: 'operator', state: 'active' });
    const human = await applianceCmd(h.dataDir, ['mounts', 'list']);
    expect(human.stdout).toContain(r.json.mountId);

    // The operator removes it: the appliance tells the agent, which unmounts.
    const rm1 = await applianceCmd(h.dataDir, ['mounts', 'remove', r.json.mountId, '--json']);
    expect(rm1.exitCode, rm1.stderr).toBe(0);
    expect(rm1.json).toMatchObject({ id: r.json.mountId, state: 'ended', endReason: 'removed by operator' });
    await expect.poll(() => fakes.db1!.unmounted.includes(r.json.mountId), { timeout: 10_000 }).toBe(true);
    expect((await agentCmd('db1', ['mounts', '--json'])).json).toEqual([]);
  }, 60_000);

  it('refuses what is wrong with the right exit status, and every command has --help', async () => {
    expect((await applianceCmd(h.dataDir, ['mount', img1, '--on', 'nobody', '--json'])).exitCode).toBe(1);
    expect((await applianceCmd(h.dataDir, ['mount', 'img-nope', '--on', 'db1'])).exitCode).toBe(1);
    expect((await applianceCmd(h.dataDir, ['mount', img1])).exitCode).toBe(2); // --on is required
    expect((await applianceCmd(h.dataDir, ['mount', img1, '--on', 'db1', '--port', '70000'])).exitCode).toBe(2);
    expect((await applianceCmd(h.dataDir, ['mounts', 'remove', 'mnt-nope'])).exitCode).toBe(1);
    expect((await agentCmd('db1', ['unmount', 'mnt-nope'])).exitCode).toBe(1);
    expect((await agentCmd('db1', ['mount', 'img-nope'])).exitCode).toBe(1);
    expect((await agentCmd('db1', ['mount', img1, '--port', 'x'])).exitCode).toBe(2);
    // --help of every command, concurrently (each is a process start).
    const helps = await Promise.all([
      ...[['mounts', 'list'], ['mounts', 'show'], ['mounts', 'remove'], ['mount']].map(async (args) => ({ args, r: await applianceCmd(h.dataDir, [...args, '--help']) })),
      ...[['mount'], ['unmount'], ['mounts']].map(async (args) => ({ args, r: await agentCmd('db1', [...args, '--help']) })),
    ]);
    for (const { args, r } of helps) {
      expect(r.exitCode, args.join(' ')).toBe(0);
      expect(r.stdout).toContain('--json');
    }
    // serve: an NBD port in use is E_BUSY (exit 75), before anything is served.
    const held = createServer();
    await new Promise<void>((r) => held.listen(0, '127.0.0.1', r));
    try {
      const port = (held.address() as AddressInfo).port;
      const busy = await execa(process.execPath, [applianceCli(), 'serve', '--data', join(root, 'busy-data'), '--listen', '127.0.0.1:0', '--nbd-listen', `127.0.0.1:${port}`],
        { reject: false, stdin: 'ignore', timeout: 30_000 });
      expect(busy.exitCode, String(busy.stderr)).toBe(75);
      expect(String(busy.stderr)).toMatch(/--nbd-listen 127\.0\.0\.1:\d+: cannot listen: EADDRINUSE/);
    } finally {
      await new Promise((r) => held.close(r));
    }
  }, 60_000);

  it('an appliance restart ends the mounts of the previous process, removes their overlays, and the agent unmounts when it reconnects', async () => {
    const r = await agentCmd('db1', ['mount', img1, '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(await readdir(join(h.dataDir, MOUNTS_DIR))).toEqual([`${r.json.mountId}.0`]);
    const port = Number(new URL(h.url).port);
    await h.close({ keepData: true });
    reopened = await Appliance.open({
      dataDir: h.dataDir, logger: createLogger('test-appliance', process.env.BLOCKSNAP_LOG ?? 'warn'), authGuard: { failBurst: 10_000 },
      backends: applianceBackends(),
      // The agent redials the same WebSocket port; the NBD port is any free one (the default, that port + 1, may be
      // another process's: CI saw EADDRINUSE there).
      nbd: { host: '127.0.0.1', port: 0 },
    });
    // Ended at start, before any agent is back: its overlay is gone and its exports are never served again.
    expect(reopened.mounts.mounts.get(r.json.mountId)).toMatchObject({ state: 'ended', endReason: expect.stringMatching(/appliance restarted/) });
    expect(await readdir(join(h.dataDir, MOUNTS_DIR))).toEqual([]);
    await reopened.listen('127.0.0.1', port);
    // The agent redials; told the mount ended, it unmounts it.
    await expect.poll(() => fakes.db1!.unmounted.includes(r.json.mountId), { timeout: 60_000, interval: 200 }).toBe(true);
    expect((await agentCmd('db1', ['mounts', '--json'])).json).toEqual([]);
  }, 120_000);
});
