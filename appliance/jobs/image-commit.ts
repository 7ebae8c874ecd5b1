import type { Logger } from 'pino';
import type { Catalog, NewImage } from '../catalog/catalog.js';
import { buildManifest, newImageId, newSetId, writeManifest, type Manifest, type ManifestStats } from '../store/manifest.js';
import type { PgImageInfo } from '../store/pg-image-info.js';

/**
 * The commit of DESIGN.md §5, in one place: what makes an image (or an image
 * set) visible, in the order that keeps a crash at any instant harmless.
 * The caller has sealed every member's map (Ingest.finish: every chunk, page
 * and root durable, the root proven equal to the agent's). Here: the
 * manifest rename is the commit point, then the catalog row. For a set, every
 * member's manifest names the whole set and the last rename is the commit
 * point; the rows go in one transaction. Roll-forward after a crash (a
 * manifest without its row) is `rollForward` in ../server/recovery.ts, the
 * other half of the same rule.
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
  storeDir: string;
  log: Logger;
  agent: string;
  jobId: string;
  pg: PgImageInfo | undefined;
}

/** Commits one volume's image; returns its manifest. */
export async function commitImage(ctx: CommitContext, m: SealedMember): Promise<Manifest> {
  const manifest = manifestOf(ctx, m, newImageId());
  await writeManifest(ctx.storeDir, manifest); // the commit point
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
  for (const m of manifests) await writeManifest(ctx.storeDir, m); // the last rename is the commit point
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
