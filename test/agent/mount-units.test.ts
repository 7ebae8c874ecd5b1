/**
 * Logic of the agent's mount without devices: command lines (the kernel
 * nbd-client attacher is only tested here — this machine has no /dev/nbd),
 * mount options, the state file (recorded before the step), which state
 * files cleanupOrphans takes (its own state dir, dead owners only), finding
 * the data directory, prepare's port.
 */
import { spawn } from 'node:child_process';
import { mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { losetupArgs } from '../../agent/mount/loop-device.js';
import { MountJournal, mountStatePath, mountsDir, readMountStates } from '../../agent/mount/mount-state.js';
import { nbdClientArgs, nbdClientDetachArgs, parseNbdUri } from '../../agent/mount/nbd-client-attacher.js';
import { defaultPgSettings, mountOptions, NbdLocalMounter, writeSparse } from '../../agent/mount/nbd-local-mounter.js';
import { nbdfuseArgs } from '../../agent/mount/nbdfuse-attacher.js';
import { findDataDirs } from '../../agent/mount/pg-data-dir.js';
import { postgresArgs } from '../../agent/mount/pg-start.js';
import { prepareDataDir } from '../../agent/pg/prepare.js';
import { processStartTime } from '../../proto/shared/proc.js';
import { codeOf } from '../support/error-code.js';
import { tempDirEach } from '../support/temp-dir.js';

const tmp = tempDirEach('bsn-mount-unit-');
let n = 0;
/** A new empty directory inside this test's temporary directory. */
async function fresh(): Promise<string> {
  const d = path.join(tmp.path, `d${n++}`);
  await mkdir(d);
  return d;
}

describe('kernel nbd-client attacher (command building only: untested against a real /dev/nbd)', () => {
  it('parses nbd:// URIs and builds the connect and detach commands', () => {
    const u = parseNbdUri('nbd://10.0.0.5:10810/a3f9c2e1d4b5a697');
    expect(u).toEqual({ host: '10.0.0.5', port: 10810, exportName: 'a3f9c2e1d4b5a697', tls: false });
    expect(nbdClientArgs(u, '/dev/nbd3', false)).toEqual(['10.0.0.5', '10810', '/dev/nbd3', '-N', 'a3f9c2e1d4b5a697', '-block-size', '4096']);
    expect(nbdClientArgs(parseNbdUri('nbd://[::1]/x'), '/dev/nbd0', true)).toEqual(['::1', '10809', '/dev/nbd0', '-N', 'x', '-block-size', '4096', '-readonly']);
    expect(nbdClientDetachArgs('/dev/nbd3')).toEqual(['-d', '/dev/nbd3']);
  });

  it('refuses TLS and what is not an NBD URI', async () => {
    expect(() => nbdClientArgs(parseNbdUri('nbds://h/x'), '/dev/nbd0', false)).toThrow(/TLS/);
    expect(await codeOf(Promise.resolve().then(() => parseNbdUri('http://h/x')))).toBe('E_USAGE');
    expect(await codeOf(Promise.resolve().then(() => parseNbdUri('not a uri')))).toBe('E_USAGE');
  });
});

describe('command lines and options', () => {
  it('nbdfuse, losetup, postgres', () => {
    expect(nbdfuseArgs('/s/d', 'nbd://h:1/n', '/s/p', true)).toEqual(['-P', '/s/p', '-r', '/s/d', 'nbd://h:1/n']);
    expect(losetupArgs('/s/d/nbd', { readOnly: false, directIo: false })).toEqual(['--find', '--show', '--direct-io=off', '/s/d/nbd']);
    expect(losetupArgs('/s/d/nbd', { readOnly: true, directIo: true })).toEqual(['--find', '--show', '--direct-io=on', '--read-only', '/s/d/nbd']);
    expect(postgresArgs({
      dataDir: '/m/pg', binDir: '/b', port: 5544, runDir: '/r', logFile: '/r/l', owner: { uid: 1, gid: 1, user: 'postgres' },
      settings: { recovery_init_sync_method: 'syncfs' },
    })).toEqual(['-D', '/m/pg', '-p', '5544', '-k', '/r', '-c', 'recovery_init_sync_method=syncfs']);
  });

  it('mount options: a read-only mount replays no journal; XFS copies need nouuid', () => {
    expect(mountOptions('ext4', true)).toEqual(['noatime', 'barrier=0']); // until barrierOn before PostgreSQL starts
    expect(mountOptions('ext4', false)).toEqual(['ro', 'noload']);
    expect(mountOptions('xfs', true)).toEqual(['noatime', 'nouuid']);
    expect(mountOptions('xfs', false)).toEqual(['ro', 'nouuid', 'norecovery']);
  });

  it('syncfs at start only where PostgreSQL has it (14+)', () => {
    expect(defaultPgSettings(150004)).toEqual({ hot_standby: 'on', recovery_init_sync_method: 'syncfs' });
    expect(defaultPgSettings(130010)).toEqual({ hot_standby: 'on' });
  });
});

describe('prepare --port', () => {
  const label = 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n';

  it('writes the port into postgresql.auto.conf; refuses a bad one', async () => {
    const dir = (await fresh());
    await writeFile(path.join(dir, 'PG_VERSION'), '15\n');
    const r = await prepareDataDir(dir, { labelFile: label, stopLsn: '0/2000100', version: 150004, port: 5544 });
    expect(r.settings.port).toBe('5544');
    expect(await readFile(path.join(dir, 'postgresql.auto.conf'), 'utf8')).toMatch(/^port = '5544'$/m);
    expect(await codeOf(prepareDataDir(dir, { labelFile: label, stopLsn: '0/2000100', version: 150004, port: 70000 }))).toBe('E_USAGE');
  });

  it('pauseAtTarget: pauses at the stop point for the caller to promote (fast promotion)', async () => {
    const dir = await fresh();
    await writeFile(path.join(dir, 'PG_VERSION'), '15\n');
    const r = await prepareDataDir(dir, { labelFile: label, stopLsn: '0/2000100', version: 150004, pauseAtTarget: true });
    expect(r.settings).toMatchObject({ recovery_target: 'immediate', recovery_target_action: 'pause' });
    const dir94 = await fresh();
    await writeFile(path.join(dir94, 'PG_VERSION'), '9.4\n');
    expect((await prepareDataDir(dir94, { labelFile: label, stopLsn: '0/2000100', version: 90410, pauseAtTarget: true })).settings)
      .toMatchObject({ pause_at_recovery_target: 'true' });
  });
});

describe('WAL written sparse', () => {
  it('zero 64 KiB blocks become holes; the file reads back equal, at full size', async () => {
    const dir = await fresh();
    const seg = Buffer.alloc(1024 * 1024 + 100);
    seg.fill(7, 0, 70_000); // first block and part of the second
    seg.fill(9, 500_000, 500_010);
    seg[seg.length - 1] = 1; // in the short last block
    const file = path.join(dir, 'seg');
    await writeSparse(file, seg);
    expect((await readFile(file)).equals(seg)).toBe(true);
    const st = await stat(file);
    expect(st.size).toBe(seg.length);
    expect(st.blocks * 512).toBeLessThan(4 * 65536 + 8192); // 3 blocks written (+ fs slack), not 1 MiB
  });
});

describe('finding the data directory', () => {
  it('finds PG_VERSION + global/pg_control a few levels down, not below a data dir, not in lost+found', async () => {
    const root = (await fresh());
    const mk = async (d: string) => {
      await mkdir(path.join(root, d, 'global'), { recursive: true });
      await writeFile(path.join(root, d, 'PG_VERSION'), '15\n');
      await writeFile(path.join(root, d, 'global', 'pg_control'), '');
    };
    await mk('15/main');
    await mk('15/main/nested');
    await mk('lost+found/x');
    await mkdir(path.join(root, 'other'), { recursive: true });
    await writeFile(path.join(root, 'other', 'PG_VERSION'), '15\n'); // no pg_control: not one
    expect(await findDataDirs([root])).toEqual([path.join(root, '15/main')]);
  });
});

describe('mount state file and orphans', () => {
  it('records a step durably before it is taken, and what it produced after', async () => {
    const state = (await fresh());
    const j = await MountJournal.create(state, { mountId: 'm1', imageId: 'img-1', target: '/t' });
    const done = await j.step({ kind: 'loop', backingFile: '/x/nbd' });
    const before = JSON.parse(await readFile(mountStatePath(state, 'm1'), 'utf8'));
    expect(before.steps).toEqual([{ kind: 'loop', backingFile: '/x/nbd' }]);
    await done({ device: '/dev/loop9' });
    expect((await readMountStates(state))[0]!.state.steps).toEqual([{ kind: 'loop', backingFile: '/x/nbd', device: '/dev/loop9' }]);
    expect((await stat(mountStatePath(state, 'm1'))).mode & 0o777).toBe(0o600);
    expect(await codeOf(MountJournal.create(state, { mountId: 'm1', imageId: 'img-1', target: '/t' }))).toBe('E_BUSY');
    expect(await codeOf(MountJournal.create(state, { mountId: '../evil', imageId: 'img-1', target: '/t' }))).toBe('E_USAGE');
  });

  it('a malformed state file is E_FORMAT naming it', async () => {
    const state = (await fresh());
    await mkdir(mountsDir(state), { recursive: true });
    await writeFile(path.join(mountsDir(state), 'bad.json'), '{"format":"other"}');
    await expect(readMountStates(state)).rejects.toMatchObject({ code: 'E_FORMAT', message: expect.stringContaining('bad.json') });
  });

  it('cleanupOrphans takes only files of its own state dir whose owner is dead; a live holder keeps its mount', async () => {
    const state = (await fresh());
    const write = async (id: string, owner: { pid: number; startTime: string | null }, stateDir = state) => {
      const made = path.join((await fresh()), id);
      await mkdir(made);
      await mkdir(mountsDir(state), { recursive: true });
      await writeFile(mountStatePath(state, id), JSON.stringify({
        format: 'blocksnap-mount', version: 1, mountId: id, imageId: 'img', stateDir, owner: { ...owner, bootId: null },
        createdAt: new Date().toISOString(), ready: true, target: made, steps: [{ kind: 'dir', path: made }],
      }));
      return made;
    };
    const sleeper = spawn('sleep', ['600'], { stdio: 'ignore' });
    try {
      const live = await write('live', { pid: sleeper.pid!, startTime: await processStartTime(sleeper.pid!) });
      const dead = await write('dead', { pid: sleeper.pid!, startTime: '1' }); // same pid, another start time: a reused pid
      const foreign = await write('foreign', { pid: 999_999_999, startTime: null }, '/elsewhere/state');
      const m = new NbdLocalMounter({ stateDir: state });
      expect(await m.cleanupOrphans()).toEqual(['dead']);
      await expect(stat(dead)).rejects.toMatchObject({ code: 'ENOENT' });
      expect((await stat(live)).isDirectory()).toBe(true);
      expect((await stat(foreign)).isDirectory()).toBe(true);
      expect((await readdir(mountsDir(state))).sort()).toEqual(['foreign.json', 'live.json']);
    } finally {
      sleeper.kill('SIGKILL');
    }
  });
});
