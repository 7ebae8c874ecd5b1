/**
 * The SnapshotProvider contract (test/agent/snapshot-provider.contract.ts)
 * against lvm-thin and lvm-classic on real LVM in the guest. One volume
 * group per suite, made and removed by the suite.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listLvs } from '../../../agent/snapshot/lvm/lvm-cli.js';
import { LvmSnapshotProvider, snapshotLvName, type LvmSnapshotMode } from '../../../agent/snapshot/lvm/lvm-snapshot-provider.js';
import type { Snapshot, VolumeSpec } from '../../../agent/snapshot/snapshot-provider.js';
import { isBlocksnapError } from '../../../proto/errors.js';
import { DATA, debugfsCat, snapshotProviderContract } from '../../agent/snapshot-provider.contract.js';
import { makeLvmRig, VG } from './lvm-rig.js';

const FILE = 'contract.dat';
const MiB = 1024 * 1024;

function lvmContract(mode: LvmSnapshotMode): void {
  snapshotProviderContract(`lvm-${mode} (real LVM in a user-mode-linux guest)`, async () => {
    const rig = await makeLvmRig({ kind: mode === 'thin' ? 'thin' : 'plain', names: ['cdata', 'cwal'], sizeMiB: 64, poolMiB: 400 });
    const logger = pino({ level: 'silent' });
    return {
      provider: () => new LvmSnapshotProvider({ mode, agent: 'guest1', stateDir: '/tmp/bsn-state', logger, cow: { percent: 25, minBytes: 16 * MiB }, pollMs: 600_000 }),
      volumes: [rig.volumes[0]!, rig.volumes[1]!],
      size: () => 64 * MiB,
      write: async (v: VolumeSpec, data: Buffer) => {
        const fh = await open(`${v.mountpoint}/${FILE}`, 'w');
        try {
          await fh.write(data, 0, data.length, 0);
          await fh.sync();
        } finally {
          await fh.close();
        }
      },
      readBack: (s) => debugfsCat(s.path, FILE),
      teardown: rig.teardown,
    };
  });
}

lvmContract('thin');
lvmContract('classic');

/**
 * Consistency groups of lvm-classic (createGroup: suspend every origin,
 * snapshot each, resume): a writer alternating between two filesystems
 * (A then B, each fsync'ed) is seen as one cut — A's count equals B's or is
 * one ahead — and a member failing midway leaves nothing suspended or made.
 */
describe('lvm-classic consistency group (two LVs, two filesystems)', () => {
  let rig: Awaited<ReturnType<typeof makeLvmRig>>;
  let a: VolumeSpec;
  let b: VolumeSpec;
  const log = pino({ level: 'silent' });
  const provider = () => new LvmSnapshotProvider({ mode: 'classic', agent: 'grp1', stateDir: '/tmp/bsn-grp', logger: log, cow: { percent: 25, minBytes: 16 * MiB }, pollMs: 600_000 });
  const seqOf = async (path: string) => Number((await execa('debugfs', ['-R', 'cat /seq', path], { stdin: 'ignore' })).stdout.trim());
  /** dm devices that are suspended now (attr "L-sw"). */
  const suspended = async () => (await execa('dmsetup', ['info', '-c', '--noheadings', '--separator', ',', '-o', 'name,attr'])).stdout
    .split('\n').filter((l) => l.split(',')[1]?.[2] === 's');
  beforeAll(async () => {
    rig = await makeLvmRig({ kind: 'plain', names: ['ga', 'gb'], sizeMiB: 64 });
    [a, b] = rig.volumes as [VolumeSpec, VolumeSpec];
  });
  afterAll(async () => {
    await rig?.teardown();
  });

  // BSN_GROUP_ROUNDS (default 1: ≈ 25–35 s each in a loaded guest) rounds; 22 in a row were run to turn lvm-classic groups on for agents.
  const rounds = Number(process.env.BSN_GROUP_ROUNDS || 1);
  it(`createGroup, ${rounds} rounds: one crash-consistent cut of a writer alternating between the two filesystems, and each member holds the file written and fsync'ed before`, async () => {
    // Each round writes round N to A, then to B, each with fsync: any single instant shows A = B or A = B + 1.
    // (A short pause between rounds leaves the guest's one CPU to LVM.)
    // Each round also writes the contract's kind of data (random, last byte "\n") to both, fsync'ed, before the group.
    const writer = execa('sh', ['-c', `i=0; while [ ! -e /tmp/grp-stop ]; do i=$((i+1)); for m in ${a.mountpoint} ${b.mountpoint}; do printf '%010d\\n' $i | dd of=$m/seq conv=notrunc,fsync status=none; done; sleep 0.05; done`], { reject: false });
    try {
      await until('the writer to start', async () => (await readFile(`${b.mountpoint}/seq`, 'utf8').catch(() => '')).trim() !== '');
      const p = provider();
      for (let round = 0; round < rounds; round++) {
        const data = [randomBytes(DATA), randomBytes(DATA)];
        for (const [i, v] of [a, b].entries()) {
          data[i]![DATA - 1] = 0x0a;
          const fh = await open(`${v.mountpoint}/${FILE}`, 'w');
          try {
            await fh.write(data[i]!, 0, DATA, 0);
            await fh.sync();
          } finally {
            await fh.close();
          }
        }
        const [sa, sb] = (await p.createGroup!([a, b], `cut${round}`)) as [Snapshot, Snapshot];
        expect(sa.freezeSeconds).toBe(sb.freezeSeconds);
        const [na, nb] = [await seqOf(sa.path), await seqOf(sb.path)];
        console.log(`group cut ${round}: A=${na} B=${nb}, suspended ${sa.freezeSeconds.toFixed(2)} s`);
        expect((await debugfsCat(sa.path, FILE)).equals(data[0]!), `round ${round}: A's file`).toBe(true);
        expect((await debugfsCat(sb.path, FILE)).equals(data[1]!), `round ${round}: B's file`).toBe(true);
        expect(na - nb, `A=${na} B=${nb}`).toBeGreaterThanOrEqual(0);
        expect(na - nb, `A=${na} B=${nb}`).toBeLessThanOrEqual(1);
        await p.remove(sa);
        await p.remove(sb);
      }
      expect(await suspended()).toEqual([]);
    } finally {
      await writeFile('/tmp/grp-stop', '');
      await writer;
    }
  });

  it('a member whose lvcreate fails midway: the group fails, the first member\'s snapshot is removed, nothing stays suspended', async () => {
    const p = provider();
    // An LV (not ours: no tags) holding the name of B's snapshot: A's lvcreate succeeds, B's fails.
    await execa('lvcreate', ['-q', '-y', '-L', '8M', '-n', snapshotLvName(b.name, 'mid'), VG]);
    try {
      const e = await p.createGroup!([a, b], 'mid').then(() => null, (err: Error) => err);
      expect(e && isBlocksnapError(e), String(e)).toBe(true);
      expect(e!.message).toMatch(/lvcreate/);
      expect(await suspended()).toEqual([]);
      expect((await listLvs([VG])).filter((l) => l.tags.includes('bsn.agent.grp1'))).toEqual([]);
      expect(existsSync('/tmp/bsn-grp/lvm-group-suspended.json')).toBe(false);
      await writeFile(`${a.mountpoint}/after`, 'writable'); // would hang on a suspended origin
      await writeFile(`${b.mountpoint}/after`, 'writable');
    } finally {
      await execa('lvremove', ['-q', '-f', `${VG}/${snapshotLvName(b.name, 'mid')}`]);
    }
  });

  it('an agent killed inside the group window: the next cleanupStale resumes the origins its marker names', async () => {
    const dm = `${VG}-${a.name}`;
    await mkdir('/tmp/bsn-grp', { recursive: true });
    await writeFile('/tmp/bsn-grp/lvm-group-suspended.json', JSON.stringify({ devices: [dm], tag: 'killed' }));
    await execa('dmsetup', ['suspend', dm]);
    expect(await suspended()).toHaveLength(1);
    expect(await provider().cleanupStale()).toEqual([`resumed:${dm}`]);
    expect(await suspended()).toEqual([]);
    await writeFile(`${a.mountpoint}/after-kill`, 'writable');
    expect(await provider().cleanupStale()).toEqual([]);
  });
});

async function until(what: string, cond: () => Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
