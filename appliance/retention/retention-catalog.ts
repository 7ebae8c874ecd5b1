/**
 * Retention's catalog tables (migration 6, DESIGN.md §12.1): pins, per-volume
 * keep policies, and deletion tombstones. Plain SQL on the catalog's
 * database; decisions live in retention-service.ts.
 */
import { BlocksnapError } from '../../proto/errors.js';
import type { Catalog } from '../catalog/catalog.js';
import type { ManifestStore } from '../store/manifest-store.js';
import { KEEP_KINDS, type KeepOptions } from './prune-policy.js';

export interface PolicyRow {
  agent: string;
  volume: string;
  keep: Required<KeepOptions>;
  updatedAt: string;
}

const now = () => new Date().toISOString();

export class RetentionCatalog {
  constructor(readonly catalog: Catalog) {}

  private get db() {
    return this.catalog.database;
  }

  pin(imageId: string): void {
    this.db.prepare('INSERT INTO image_pins (image_id, pinned_at) VALUES (?, ?) ON CONFLICT (image_id) DO NOTHING').run(imageId, now());
  }

  unpin(imageId: string): boolean {
    return this.db.prepare('DELETE FROM image_pins WHERE image_id = ?').run(imageId).changes > 0;
  }

  pinned(): Set<string> {
    return new Set(this.db.prepare('SELECT image_id FROM image_pins').pluck().all() as string[]);
  }

  setPolicy(agent: string, volume: string, keep: KeepOptions): PolicyRow {
    const k = Object.fromEntries(KEEP_KINDS.map((n) => [n, keep[n] ?? 0])) as Required<KeepOptions>;
    this.db.prepare(`INSERT INTO retention_policies (agent, volume, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, updated_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent, volume) DO UPDATE SET keep_last = excluded.keep_last,
       keep_hourly = excluded.keep_hourly, keep_daily = excluded.keep_daily, keep_weekly = excluded.keep_weekly,
       keep_monthly = excluded.keep_monthly, keep_yearly = excluded.keep_yearly, updated_at = excluded.updated_at`)
      .run(agent, volume, k.last, k.hourly, k.daily, k.weekly, k.monthly, k.yearly, now());
    return this.policy(agent, volume)!;
  }

  removePolicy(agent: string, volume: string): boolean {
    return this.db.prepare('DELETE FROM retention_policies WHERE agent = ? AND volume = ?').run(agent, volume).changes > 0;
  }

  policy(agent: string, volume: string): PolicyRow | undefined {
    const r = this.db.prepare('SELECT * FROM retention_policies WHERE agent = ? AND volume = ?').get(agent, volume);
    return r ? policyRow(r) : undefined;
  }

  policies(): PolicyRow[] {
    return (this.db.prepare('SELECT * FROM retention_policies ORDER BY agent, volume').all() as any[]).map(policyRow);
  }

  /**
   * Step 1 of a deletion (DESIGN.md §12.1), one transaction: tombstones in,
   * catalog rows (and their pins and damage rows) out. From here on the
   * images are invisible: not listed, never a basis.
   */
  tombstone(ids: readonly string[]): void {
    this.db.transaction(() => {
      const ins = this.db.prepare('INSERT INTO image_deletions (image_id, deleted_at) VALUES (?, ?) ON CONFLICT (image_id) DO NOTHING');
      for (const id of ids) {
        ins.run(id, now());
        this.db.prepare('DELETE FROM images WHERE id = ?').run(id);
        this.db.prepare('DELETE FROM image_pins WHERE image_id = ?').run(id);
        this.db.prepare('DELETE FROM image_damage WHERE image_id = ?').run(id);
      }
    })();
  }

  tombstones(): string[] {
    return this.db.prepare('SELECT image_id FROM image_deletions ORDER BY image_id').pluck().all() as string[];
  }

  clearTombstone(id: string): void {
    this.db.prepare('DELETE FROM image_deletions WHERE image_id = ?').run(id);
  }
}

/**
 * Steps 2-3 of every deletion still in progress: the manifest goes (durably),
 * then the tombstone. Run after a deletion, and at start before roll-forward
 * (a crash between the steps would otherwise bring the image back).
 */
export async function finishDeletions(catalog: Catalog, manifests: ManifestStore, step?: (name: string) => void | Promise<void>): Promise<string[]> {
  const rc = new RetentionCatalog(catalog);
  const ids = rc.tombstones();
  for (const id of ids) {
    await manifests.remove(id);
    await step?.('manifest-removed');
    rc.tombstone([id]); // a row roll-forward put back meanwhile goes too (idempotent)
    rc.clearTombstone(id);
    await step?.('tombstone-cleared');
  }
  return ids;
}

function policyRow(r: any): PolicyRow {
  return {
    agent: r.agent, volume: r.volume, updatedAt: r.updated_at,
    keep: { last: r.keep_last, hourly: r.keep_hourly, daily: r.keep_daily, weekly: r.keep_weekly, monthly: r.keep_monthly, yearly: r.keep_yearly },
  };
}

export function checkKeep(keep: KeepOptions): void {
  for (const n of KEEP_KINDS) {
    const v = keep[n];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new BlocksnapError('E_USAGE', `--keep-${n} must be a whole number ≥ 0`);
  }
}
