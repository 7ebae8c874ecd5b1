/**
 * What the mount manager needs of the NBD side (a port: the manager decides
 * who gets which export, the backend builds exports). The appliance composes
 * nbd-mount-backend.ts (image source + copy-on-write overlay, appliance/nbd/);
 * unit tests pass a fake.
 */
import type { PgImageInfo } from '../store/pg-image-info.js';
import type { NbdExport } from '../nbd/nbd-export.js';

/** One image a mount exports (a lone image, or one member of an image set). */
export interface MountImage {
  imageId: string;
  volume: string;
  rootDigest: Buffer;
  size: number;
  chunkSize: number;
  pg: PgImageInfo | null;
}

/** An export shared by every connection to one export name, closed when its mount ends. */
export interface OpenedExport {
  export: NbdExport;
  close(): Promise<void>;
}

export interface MountBackend {
  /** Creates an empty overlay for `image` in `dir` (a new directory): O(1) in the image size. */
  createOverlay(dir: string, image: MountImage): Promise<void>;
  /** The export of `image`: read-only (overlayDir null), or writing into the overlay in `overlayDir`. */
  open(image: MountImage, overlayDir: string | null): Promise<OpenedExport>;
}
