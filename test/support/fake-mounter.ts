import { execa } from 'execa';
import type { LocalMount, LocalMountOptions, LocalMounter, MountGrant, WalSource } from '../../agent/mount/mount-port.js';
import { BlocksnapError } from '../../proto/errors.js';

/**
 * A LocalMounter for wiring tests: it records each grant, proves every
 * export is served to it (`nbdinfo --size` on the grant's URI, from this
 * host, as the real attach would connect), fetches every WAL segment the
 * image needs through the WalSource, and "mounts" nothing.
 */
export class FakeMounter implements LocalMounter {
  readonly grants: MountGrant[] = [];
  readonly wal = new Map<string, Buffer>();
  readonly sizes = new Map<string, number>();
  readonly unmounted: string[] = [];
  private readonly live = new Map<string, LocalMount>();
  cleanedAtStart = 0;

  async mount(grant: MountGrant, wal: WalSource, opts: LocalMountOptions): Promise<LocalMount> {
    const started = performance.now();
    this.grants.push(grant);
    for (const x of grant.exports) {
      const r = await execa('nbdinfo', ['--size', x.uri], { timeout: 30_000, reject: false });
      if (r.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `nbdinfo ${x.uri}: ${r.stderr}`);
      this.sizes.set(x.uri, Number(r.stdout.trim()));
      for (const name of x.pg?.wal ?? []) this.wal.set(name, await wal(x.imageId, name));
    }
    const m: LocalMount = {
      mountId: grant.mountId, imageId: grant.imageId, target: opts.target ?? `/run/fake/${grant.mountId}`, dataDir: '/run/fake/data',
      pgPort: opts.pgPort ?? 5999, connection: `host=/run/fake port=${opts.pgPort ?? 5999} dbname=postgres`,
      secondsToFirstQuery: (performance.now() - started) / 1000,
    };
    this.live.set(m.mountId, m);
    return m;
  }

  async unmount(mountId: string): Promise<void> {
    if (!this.live.delete(mountId)) throw new BlocksnapError('E_NOT_FOUND', `no mount ${mountId}`);
    this.unmounted.push(mountId);
  }

  async list(): Promise<LocalMount[]> {
    return [...this.live.values()];
  }

  async cleanupOrphans(): Promise<string[]> {
    this.cleanedAtStart++;
    return [];
  }
}
