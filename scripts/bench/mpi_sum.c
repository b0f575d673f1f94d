/* The cost of softprompt's gradient sum under MPI (crates/softprompt-cli/src/mpi_collective.rs:
 * gather every rank's f32 buffer on rank 0, add in rank order, broadcast), against MPI_Allreduce
 * of the same buffer, for buffer sizes of soft prompts. Used for docs/SCALING.md.
 *
 *   mpicc -O2 -o /tmp/mpi_sum scripts/bench/mpi_sum.c
 *   mpirun -np 2 /tmp/mpi_sum        # prints: ranks floats gather_sum_bcast_us allreduce_us
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static double gather_sum_bcast(float *v, float *all, int n, int rank, int size) {
  MPI_Gather(v, n, MPI_FLOAT, all, n, MPI_FLOAT, 0, MPI_COMM_WORLD);
  if (rank == 0)
    for (int i = 0; i < n; i++) {
      float s = all[i];
      for (int r = 1; r < size; r++) s += all[(size_t)r * n + i];
      v[i] = s;
    }
  MPI_Bcast(v, n, MPI_FLOAT, 0, MPI_COMM_WORLD);
  return v[0];
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int sizes[] = {4 * 576, 20 * 576, 20 * 2048, 20 * 4096, 100 * 4096, 1 << 20};
  for (unsigned k = 0; k < sizeof sizes / sizeof *sizes; k++) {
    int n = sizes[k];
    float *v = malloc(sizeof(float) * n), *w = malloc(sizeof(float) * n);
    float *all = malloc(sizeof(float) * (size_t)n * size);
    for (int i = 0; i < n; i++) v[i] = 1e-3f * (i % 97) + rank;
    int reps = n > 100000 ? 50 : 500;
    double sink = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    for (int r = 0; r < reps; r++) sink += gather_sum_bcast(v, all, n, rank, size);
    double ours = (MPI_Wtime() - t0) / reps;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = MPI_Wtime();
    for (int r = 0; r < reps; r++) MPI_Allreduce(v, w, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double theirs = (MPI_Wtime() - t0) / reps;
    if (rank == 0) printf("%d %d %.1f %.1f%s\n", size, n, ours * 1e6, theirs * 1e6, sink == 0.5 ? " " : "");
    free(v), free(w), free(all);
  }
  MPI_Finalize();
  return 0;
}
