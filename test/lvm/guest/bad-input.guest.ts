/**
 * Bad input for the LVM providers (issue 10), on real LVM in the guest:
 * each case is a clear error and leaves nothing behind (no snapshot LV of
 * the agent); a CoW area that fills is caught before the job can read an
 * invalid snapshot; a killed agent's orphans are removed by the next one,
 * and only its own; a filesystem on a device stacked over its LV that a
 * killed agent left frozen is thawed by the next one.
 */
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, readdir, writeFile as writeFileRaw } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listLvs } from '../../../agent/snapshot/lvm/lvm-cli.js';
import { LvmSnapshotProvider, type LvmSnapshotProviderOptions } from '../../../agent/snapshot/lvm/lvm-snapshot-provider.js';
import type { VolumeSpec } from '../../../agent/snapshot/snapshot-provider.js';
import { isBlocksnapError } from '../../../proto/errors.js';
import { makeLvmRig, sh, VG, type LvmRig } from './lvm-rig.js';

const MiB = 1024 * 1024;
/** The compiled provider of this checkout (wherever it is: the guest mounts it at the same path). */
const COMPILED_PROVIDER = fileURLToPath(new URL('../../../dist/agent/snapshot/lvm/lvm-snapshot-provider.js', import.meta.url));
const log = pino({ level: 'silent' });
const provider = (o: Partial<LvmSnapshotProviderOptions> = {}) =>
  new LvmSnapshotProvider({ mode: 'classic', agent: 'bad1', stateDir: '/tmp/bsn-bad', logger: log, pollMs: 300, ...o });

async function rejection(p: Promise<unknown>): Promise<Error> {
  return p.then(() => {
    throw new Error('expected a rejection');
  }, (e: Error) => e);
}

async function writeFile(v: VolumeSpec, bytes: number, fill = 0xa5): Promise<void> {
  const fh = await open(`${v.mountpoint}/fill.dat`, 'w');
  try {
    const buf = Buffer.alloc(MiB);
    for (let off = 0; off < bytes; off += MiB) {
      buf.fill((fill + off / MiB) & 0xff);
      await fh.write(buf, 0, MiB, off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** True once reading the device fails (the watcher put the error target in). */
async function readFails(path: string): Promise<boolean> {
  const r = await execa('dd', [`if=${path}`, 'of=/dev/null', 'bs=64k', 'count=16', 'iflag=direct'], { reject: false });
  return r.exitCode !== 0;
}

async function until(what: string, cond: () => Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const agentLvs = async (agent = 'bad1') => (await listLvs([VG])).filter((l) => l.tags.includes(`bsn.agent.${agent}`)).map((l) => l.name);

describe('LVM providers: bad input', () => {
  let rig: LvmRig;
  let a: VolumeSpec;
  let b: VolumeSpec;
  beforeAll(async () => {
    rig = await makeLvmRig({ kind: 'plain', names: ['bada', 'badb'], sizeMiB: 64 });
    [a, b] = rig.volumes as [VolumeSpec, VolumeSpec];
  });
  afterAll(async () => {
    await rig?.teardown();
  });

  it('a missing volume group, a missing LV: clear errors naming them, nothing left', async () => {
    const p = provider();
    const noVg = await rejection(p.create({ ...a, device: '/dev/novg/data' }, 'j1'));
    expect(isBlocksnapError(noVg), String(noVg)).toBe(true);
    expect(noVg.message).toMatch(/volume group novg not found/);
    const noLv = await rejection(p.create({ ...a, device: `/dev/${VG}/nolv` }, 'j1'));
    expect(noLv.message).toMatch(new RegExp(`logical volume ${VG}/nolv not found`));
    expect(await agentLvs()).toEqual([]);
  });

  it('an LV that is not the device of the mountpoint is refused by proveIdentity (E_IDENTITY) with both devices named', async () => {
    const e = await rejection(provider().proveIdentity({ ...a, mountpoint: b.mountpoint }));
    expect(isBlocksnapError(e, 'E_IDENTITY'), String(e)).toBe(true);
    expect(e.message).toMatch(/mountpoint/);
    expect(e.message).toContain(b.mountpoint);
  });

  it('no free extents for the CoW area: a clear error before anything is created', async () => {
    const free = Number((await sh('vgs', ['--noheadings', '--units', 'b', '--nosuffix', '-o', 'vg_free', VG])).trim());
    await sh('lvcreate', ['-q', '-L', `${free}b`, '-n', 'filler', VG]);
    try {
      const e = await rejection(provider().create(a, 'j2'));
      expect(e.message).toMatch(/no free extents in volume group bsnvg/);
      expect(await agentLvs()).toEqual([]);
    } finally {
      await sh('lvremove', ['-q', '-f', `${VG}/filler`]);
    }
  });

  it('a CoW area filling past the limit: the snapshot device fails every read before it overflows, and remove leaves nothing', async () => {
    const p = provider({ cow: { percent: 1, minBytes: 8 * MiB }, fillLimitPercent: 50 });
    const s = await p.create(a, 'j3');
    expect(await readFails(s.path)).toBe(false);
    await writeFile(a, 5 * MiB); // > 50 % of 8 MiB, < 100 %
    await until('the watcher to fail the snapshot', () => readFails(s.path));
    const lv = (await listLvs([VG])).find((l) => s.path.endsWith(`/${l.name}`));
    expect(lv?.attr[4]).not.toBe('I'); // caught before the kernel invalidated it
    await p.remove(s);
    expect(await agentLvs()).toEqual([]);
  });

  it('a CoW area that overflows (invalidated by the kernel) is never read: its device fails, the reason is logged, remove leaves nothing', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'error' }, { write: (l: string) => void lines.push(l) });
    const p = provider({ cow: { percent: 1, minBytes: 8 * MiB }, fillLimitPercent: 101, logger });
    const s = await p.create(a, 'j4');
    try {
      await writeFile(a, 24 * MiB, 0x5a);
      // dm-snapshot already fails reads of an invalid snapshot; the watcher then names the reason and
      // swaps in the error target (so lvs no longer shows it 'I'): wait for its log line.
      await until('the watcher to report the invalid snapshot', async () => /invalidated by the kernel \(its CoW area overflowed\)/.test(lines.join('')));
      expect(await readFails(s.path)).toBe(true);
    } finally {
      await p.remove(s);
    }
    expect(await agentLvs()).toEqual([]);
  });

  it('a thin pool filling past the limit during the job: the snapshot device fails every read, the reason is logged, remove leaves nothing', async () => {
    await sh('lvcreate', ['-q', '-L', '64M', '--chunksize', '64k', '-Zn', '-T', `${VG}/tpool`]);
    await sh('lvcreate', ['-q', '-V', '128M', '-T', `${VG}/tpool`, '-n', 'badt']); // over-provisioned on purpose
    const t: VolumeSpec = { name: 'badt', device: `/dev/${VG}/badt`, mountpoint: '/mnt/badt', chunkSize: 65536 };
    await sh('mkfs.ext4', ['-q', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', t.device]);
    await sh('mkdir', ['-p', t.mountpoint]);
    await sh('mount', [t.device, t.mountpoint]);
    const lines: string[] = [];
    const logger = pino({ level: 'error' }, { write: (l: string) => void lines.push(l) });
    const p = provider({ mode: 'thin', fillLimitPercent: 50, logger });
    try {
      const s = await p.create(t, 'j5');
      try {
        await writeFile(t, 40 * MiB, 0x33); // the pool passes 50 % (40 of 64 MiB), far from full
        await until('the watcher to report the pool', async () => /thin pool bsnvg\/tpool is [\d.]+% full \(limit 50%\)/.test(lines.join('')));
        expect(await readFails(s.path)).toBe(true);
      } finally {
        await p.remove(s);
      }
      expect(await agentLvs()).toEqual([]);
      expect((await sh('dmsetup', ['status', `${VG}-tpool-tpool`])).trim().split(/\s+/)[6]).toBe('-'); // no reserved metadata snapshot
    } finally {
      await execa('umount', [t.mountpoint], { reject: false });
      await sh('lvremove', ['-q', '-f', `${VG}/badt`, `${VG}/tpool`]);
    }
  });

  it('lvcreate failing midway (the thin snapshot made, its activation failing): a clear error, the snapshot removed, no metadata snapshot held, the volume writable', async () => {
    await sh('lvcreate', ['-q', '-y', '-L', '64M', '--chunksize', '64k', '-Zn', '-T', `${VG}/mpool`]);
    await sh('lvcreate', ['-q', '-y', '-V', '32M', '-T', `${VG}/mpool`, '-n', 'badm']);
    const m: VolumeSpec = { name: 'badm', device: `/dev/${VG}/badm`, mountpoint: '/mnt/badm', chunkSize: 65536 };
    await sh('mkfs.ext4', ['-q', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', m.device]);
    await sh('mkdir', ['-p', m.mountpoint]);
    await sh('mount', [m.device, m.mountpoint]);
    // The second LVM step fails for real reasons too (activation refused, out of memory); here an
    // lvchange that fails stands in for them, after lvcreate has made the snapshot LV.
    await mkdir('/tmp/bsn-shim', { recursive: true });
    await writeFileRaw('/tmp/bsn-shim/lvchange', '#!/bin/sh\necho "  Activation of logical volume refused (injected)." >&2\nexit 5\n', { mode: 0o755 });
    const path = process.env.PATH;
    try {
      process.env.PATH = `/tmp/bsn-shim:${path}`;
      const e = await rejection(provider({ mode: 'thin' }).create(m, 'j6'));
      process.env.PATH = path;
      expect(isBlocksnapError(e), String(e)).toBe(true);
      expect(e.message).toMatch(/lvchange .*Activation of logical volume refused/);
      expect(await agentLvs()).toEqual([]);
      const status = (await sh('dmsetup', ['status', `${VG}-mpool-tpool`])).trim().split(/\s+/);
      expect(status[6], status.join(' ')).toBe('-'); // no reserved metadata snapshot
      await writeFileRaw(`${m.mountpoint}/after`, 'writable'); // would hang on a frozen filesystem
    } finally {
      process.env.PATH = path;
      await execa('umount', [m.mountpoint], { reject: false });
      await sh('lvremove', ['-q', '-f', `${VG}/badm`, `${VG}/mpool`]);
    }
  });

  it('kill -9 of an agent holding a snapshot: the restarted agent removes its orphan, and not another agent\'s snapshot', async () => {
    const other = provider({ agent: 'other1' });
    const theirs = await other.create(b, 'keep');
    const script = `import { LvmSnapshotProvider } from '${COMPILED_PROVIDER}';
const p = new LvmSnapshotProvider({ mode: 'classic', agent: 'bad1', stateDir: '/tmp/bsn-bad', pollMs: 60000 });
await p.create(${JSON.stringify(a)}, 'orphan');
console.log('READY');
setInterval(() => {}, 1000);`;
    const child = execa('node', ['--input-type=module', '-e', script], { reject: false, buffer: false });
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => d.toString().includes('READY') && resolve());
      void child.then((r) => reject(new Error(`child exited ${r.exitCode}: ${String(r.stderr ?? '')}`)));
    });
    child.kill('SIGKILL');
    await child;
    expect(await agentLvs()).toEqual(['bsn.bada.orphan']);
    const released = await provider().cleanupStale();
    expect(released).toEqual(['snapshot:bada@orphan']);
    expect(await agentLvs()).toEqual([]);
    expect(await agentLvs('other1')).toEqual(['bsn.badb.keep']);
    await other.remove(theirs);
  });

  it('kill -9 of an agent while it holds a filesystem stacked over its LV frozen: the restarted agent thaws it and removes the orphan', async () => {
    // The filesystem is on a dm device over the LV (as the standby's over dm-era): LVM's suspend does not
    // freeze it, the provider does, around lvcreate. lvcreate waits for the VG's write lock, which a shared
    // holder keeps (the provider's own lvs/vgs reads pass): the agent is killed inside the freeze.
    const lockFile = `${(await sh('lvmconfig', ['--typeconfig', 'full', 'global/locking_dir'])).split('=')[1]!.replace(/"/g, '').trim()}/V_${VG}`;
    await sh('lvcreate', ['-q', '-y', '-L', '32M', '-n', 'badc', VG]);
    const c: VolumeSpec = { name: 'badc', device: '/dev/mapper/badclin', lv: `${VG}/badc`, mountpoint: '/mnt/badc', chunkSize: 65536 };
    let holder: ReturnType<typeof execa> | undefined;
    let child: ReturnType<typeof execa> | undefined;
    try {
      await sh('dmsetup', ['create', 'badclin', '--table', `0 ${(await sh('blockdev', ['--getsz', `/dev/${VG}/badc`])).trim()} linear /dev/${VG}/badc 0`]);
      await sh('dmsetup', ['mknodes', 'badclin']); // no udev in the guest
      await sh('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', c.device]);
      await mkdir(c.mountpoint, { recursive: true });
      await sh('mount', [c.device, c.mountpoint]);
      holder = execa('sh', ['-c', 'exec 9>"$0"; flock -s 9; echo held; exec sleep 600', lockFile], { reject: false, buffer: false });
      await new Promise<void>((resolve, reject) => {
        holder!.stdout!.on('data', (d: Buffer) => d.toString().includes('held') && resolve());
        void holder!.then((r) => reject(new Error(`lock holder exited ${r.exitCode}`)));
      });
      const script = `import { LvmSnapshotProvider } from '${COMPILED_PROVIDER}';
const p = new LvmSnapshotProvider({ mode: 'classic', agent: 'bad1', stateDir: '/tmp/bsn-bad', pollMs: 60000 });
await p.create(${JSON.stringify(c)}, 'frozen');`;
      child = execa('node', ['--input-type=module', '-e', script], { reject: false });
      // lvcreate runs once the filesystem is frozen; it is the process naming the snapshot LV.
      await until('lvcreate of bsn.badc.frozen waiting for the lock', async () => (await lvcreatePids('bsn.badc.frozen')).length > 0);
      child.kill('SIGKILL');
      await child;
      expect(existsSync('/tmp/bsn-bad/freeze-badc.json'), 'the freeze marker the killed agent left').toBe(true);
      // The killed agent's lvcreate goes on once the lock is free, and makes its (orphan) snapshot.
      holder.kill('SIGKILL');
      await holder;
      await until('the orphaned lvcreate to finish', async () => (await lvcreatePids('bsn.badc.frozen')).length === 0, 120_000);
      const released = await provider().cleanupStale();
      expect(released).toEqual(expect.arrayContaining(['thawed:/mnt/badc', 'marker:badc', 'snapshot:badc@frozen']));
      expect(existsSync('/tmp/bsn-bad/freeze-badc.json')).toBe(false);
      await writeFileRaw(`${c.mountpoint}/after-kill`, 'writable');
      await sh('sync', ['-f', `${c.mountpoint}/after-kill`]);
      expect(await agentLvs()).toEqual([]);
    } finally {
      child?.kill('SIGKILL');
      holder?.kill('SIGKILL');
      await execa('fsfreeze', ['-u', c.mountpoint], { reject: false });
      await execa('umount', [c.mountpoint], { reject: false });
      await execa('dmsetup', ['remove', 'badclin'], { reject: false });
      for (const lv of await agentLvs()) await execa('lvremove', ['-q', '-f', `${VG}/${lv}`], { reject: false });
      await execa('lvremove', ['-q', '-f', `${VG}/badc`], { reject: false });
    }
  });
});

/** PIDs of lvcreate processes whose command line names `lvName`. */
async function lvcreatePids(lvName: string): Promise<number[]> {
  const out: number[] = [];
  for (const pid of (await readdir('/proc')).filter((n) => /^\d+$/.test(n))) {
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (argv.some((a) => a.endsWith('lvcreate')) && argv.includes(lvName)) out.push(Number(pid));
  }
  return out;
}
