/**
 * Mounts as catalog objects (DESIGN.md §6.2): the `mounts` and
 * `mount_exports` tables of catalog migration 5. Plain SQL on the catalog's
 * database; decisions (who may mount what, names, overlays) live in
 * mount-manager.ts.
 */
import type { Catalog } from '../catalog/catalog.js';

export type MountState = 'active' | 'ended';
export type MountRequester = 'agent' | 'operator';

export interface MountExportRow {
  volume: string;
  imageId: string;
  /** The NBD export name: a secret of 128 random bits. */
  exportName: string;
  /** Overlay directory name under DATA/mounts/ (writable mounts), derived from the mount id; null: read-only. */
  overlay: string | null;
}

export interface MountRow {
  id: string;
  /** The image id, or the image set id, that was mounted. */
  imageRef: string;
  agentId: number;
  agent: string;
  /** The agent's address the export names were handed to: only it may connect. */
  peerAddress: string;
  writable: boolean;
  requestedBy: MountRequester;
  createdAt: string;
  expiresAt: string | null;
  state: MountState;
  endedAt: string | null;
  endReason: string | null;
  exports: MountExportRow[];
}

export type NewMount = Omit<MountRow, 'agent' | 'state' | 'endedAt' | 'endReason'>;

export class MountCatalog {
  constructor(private readonly catalog: Catalog) {}

  private get db() {
    return this.catalog.database;
  }

  insert(m: NewMount): void {
    const db = this.db;
    db.transaction(() => {
      db.prepare(`INSERT INTO mounts (id, image_ref, agent_id, peer_address, writable, requested_by, created_at, expires_at, state)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active')`)
        .run(m.id, m.imageRef, m.agentId, m.peerAddress, m.writable ? 1 : 0, m.requestedBy, m.createdAt, m.expiresAt);
      const ins = db.prepare('INSERT INTO mount_exports (mount_id, volume, image_id, export_name, overlay) VALUES (?, ?, ?, ?, ?)');
      for (const x of m.exports) ins.run(m.id, x.volume, x.imageId, x.exportName, x.overlay);
    })();
  }

  get(id: string): MountRow | undefined {
    const r = this.db.prepare(`${MOUNT_SELECT} WHERE m.id = ?`).get(id);
    return r ? this.row(r) : undefined;
  }

  /** Active mounts (all, with `all`), newest first. */
  list(opts: { all?: boolean } = {}): MountRow[] {
    const rows = this.db.prepare(`${MOUNT_SELECT} WHERE (? = 1 OR m.state = 'active') ORDER BY m.created_at DESC, m.id DESC`).all(opts.all ? 1 : 0);
    return rows.map((r) => this.row(r));
  }

  /** Marks a mount ended; false if it was not active. */
  end(id: string, reason: string): boolean {
    return this.db.prepare(`UPDATE mounts SET state = 'ended', ended_at = ?, end_reason = ? WHERE id = ? AND state = 'active'`)
      .run(new Date().toISOString(), reason, id).changes > 0;
  }

  /** Active mounts that export this image (a member of a mounted set counts). */
  activeMountsOf(imageId: string): string[] {
    return (this.db.prepare(`SELECT DISTINCT m.id FROM mounts m JOIN mount_exports x ON x.mount_id = m.id
                             WHERE m.state = 'active' AND x.image_id = ? ORDER BY m.id`).all(imageId) as { id: string }[]).map((r) => r.id);
  }

  private row(r: any): MountRow {
    const exports = (this.db.prepare('SELECT volume, image_id, export_name, overlay FROM mount_exports WHERE mount_id = ? ORDER BY volume').all(r.id) as any[])
      .map((x) => ({ volume: x.volume, imageId: x.image_id, exportName: x.export_name, overlay: x.overlay ?? null }));
    return {
      id: r.id, imageRef: r.image_ref, agentId: r.agent_id, agent: r.agent, peerAddress: r.peer_address, writable: r.writable === 1,
      requestedBy: r.requested_by, createdAt: r.created_at, expiresAt: r.expires_at ?? null, state: r.state,
      endedAt: r.ended_at ?? null, endReason: r.end_reason ?? null, exports,
    };
  }
}

const MOUNT_SELECT = 'SELECT m.*, a.name AS agent FROM mounts m JOIN agents a ON a.id = m.agent_id';
