import type { Logger } from 'pino';
import { toBlocksnapError } from '../../proto/errors.js';
import type { Catalog, NewImage } from '../catalog/catalog.js';
import { buildManifest, newImageId, newSetId, type Manifest, type ManifestStats } from '../store/manifest.js';
import type { ManifestStore } from '../store/manifest-store.js';
import type { QuarantineRecord } from '../store/quarantine.js';
import type { PgImageInfo } from '../store/pg-image-info.js';

/**
 * The commit of DESIGN.md §5, in one place: what makes an image (or an image
 * set) visible, in the order that keeps a crash at any instant harmless.
 * The caller has sealed every member's map (Ingest.finish: every chunk, page
 * and root durable, the root proven equal to the agent's). Here: the
 * manifest rename is the commit point, then the catalog row. For a set, every
 * member's manifest names the whole set and the last rename is the commit
 * point; the rows go in one transaction. Roll-forward after a crash (a
 * manifest without its row gets it; a set missing a member is removed) is
 * the other half of the same rule, below.
 */
export interface SealedMember {
  volume: string;
  volumeSize: number;
  chunkSize: number;
  kind: 'full' | 'incremental';
  basisImageId: string | null;
  rootDigest: Buffer;
  stats: ManifestStats;
}

export interface CommitContext {
  catalog: Catalog;
  manifests: ManifestStore;
  log: Logger;
  agent: string;
  jobId: string;
  pg: PgImageInfo | undefined;
}

/** Commits one volume's image; returns its manifest. */
export async function commitImage(ctx: CommitContext, m: SealedMember): Promise<Manifest> {
  const manifest = manifestOf(ctx, m, newImageId());
  await ctx.manifests.put(manifest); // the commit point
  ctx.catalog.insertImage(newImageOf(manifest, m.stats));
  ctx.log.info({ job: ctx.jobId, image: manifest.imageId, ...m.stats }, 'image committed');
  return manifest;
}

/** Commits a consistency group's members as one image set; returns the manifests in member order. */
export async function commitImageSet(ctx: CommitContext, members: SealedMember[]): Promise<{ setId: string; manifests: Manifest[] }> {
  const setId = newSetId();
  const ids = members.map(() => newImageId());
  const set = { id: setId, images: ids };
  const manifests = members.map((m, i) => manifestOf(ctx, m, ids[i]!, set));
  for (const m of manifests) await ctx.manifests.put(m); // the last put (rename) is the commit point
  ctx.catalog.insertImages(manifests.map((m, i) => newImageOf(m, members[i]!.stats)));
  ctx.log.info({ job: ctx.jobId, set: setId, images: ids }, 'image set committed');
  return { setId, manifests };
}

function manifestOf(ctx: CommitContext, m: SealedMember, imageId: string, set?: { id: string; images: string[] }): Manifest {
  return buildManifest({
    imageId, agent: ctx.agent, volume: m.volume, volumeSize: m.volumeSize, chunkSize: m.chunkSize, kind: m.kind,
    basisImageId: m.basisImageId, jobId: ctx.jobId, rootDigest: m.rootDigest.toString('hex'), stats: m.stats, pg: ctx.pg, set,
  });
}

export function newImageOf(m: Manifest, stats: ManifestStats): NewImage {
  return {
    id: m.imageId, agent: m.agent, volume: m.volume, jobId: m.jobId, kind: m.kind, basisImageId: m.basisImageId,
    rootDigest: m.rootDigest, volumeSize: m.volumeSize, chunkSize: m.chunkSize, createdAt: m.createdAt, stats,
    pg: m.pg ?? null, setId: m.set?.id ?? null,
  };
}

/**
 * Inserts a catalog row for every manifest that lacks one (DESIGN.md §5 step
 * 4). A manifest of an image set whose other members' manifests are not all
 * in the store is the trace of a crash inside the set's commit: the set was
 * never visible (its catalog rows come after all its manifests), so that
 * manifest is deleted, never listed. Only manifests without a row are read:
 * a set with rows was complete. A manifest that cannot be read is moved to
 * the quarantine and its image recorded as damaged; the others still get
 * their rows.
 */
export async function rollForward(
  catalog: Catalog, manifests: ManifestStore, createAgents: boolean, log?: Logger, out?: { quarantined: QuarantineRecord[] },
): Promise<number> {
  const have = catalog.imageIds();
  const present = new Set(await manifests.list());
  const rows: NewImage[] = [];
  for (const id of present) {
    if (have.has(id)) continue;
    let m;
    try {
      m = await manifests.get(id);
    } catch (e) {
      const err = toBlocksnapError(e, 'E_STORE_CORRUPT');
      if (err.code !== 'E_STORE_CORRUPT' && err.code !== 'E_FORMAT') throw err;
      const rec = await manifests.quarantine(id, err.message);
      catalog.recordDamage(id, `manifest ${id}`, `unreadable, quarantined to ${rec.to}: ${err.message}`);
      out?.quarantined.push(rec);
      log?.error({ image: id, reason: err.message, movedTo: rec.to }, 'quarantined an unreadable manifest: the image is damaged');
      continue;
    }
    if (m.set && !m.set.images.every((i) => present.has(i))) {
      log?.warn({ image: id, set: m.set.id, missing: m.set.images.filter((i) => !present.has(i)) }, 'removing a manifest of an incomplete image set');
      await manifests.remove(id);
      continue;
    }
    rows.push(newImageOf(m, m.stats));
  }
  // One transaction: the members of a set appear together.
  catalog.insertImages(rows, { createAgent: createAgents });
  return rows.length;
}
