//! The little dense linear algebra the Fréchet distance needs, in f64 on row-major `Vec`s:
//! a symmetric eigendecomposition (cyclic Jacobi, exact enough and fast for dims <= ~256) and
//! the square root of a positive semi-definite matrix built on it.

/// Eigenvalues and eigenvectors of the symmetric `n` x `n` matrix `a` (row-major; only
/// symmetric input is meaningful). Returns (values, vectors) with eigenvector k in column k.
pub fn sym_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = identity(n);
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        // Converged once the off-diagonal mass is at rounding level relative to the matrix.
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                rotate(&mut a, &mut v, n, p, q);
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// One Jacobi rotation zeroing a[p][q]: A <- J^T A J, V <- V J.
fn rotate(a: &mut [f64], v: &mut [f64], n: usize, p: usize, q: usize) {
    let apq = a[p * n + q];
    if apq == 0.0 {
        return;
    }
    let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
    // The smaller root of t^2 + 2 t theta - 1 = 0 keeps the rotation angle below pi/4 (stable).
    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
    let c = 1.0 / (t * t + 1.0).sqrt();
    let s = t * c;
    for k in 0..n {
        let (kp, kq) = (a[k * n + p], a[k * n + q]);
        a[k * n + p] = c * kp - s * kq;
        a[k * n + q] = s * kp + c * kq;
    }
    for k in 0..n {
        let (pk, qk) = (a[p * n + k], a[q * n + k]);
        a[p * n + k] = c * pk - s * qk;
        a[q * n + k] = s * pk + c * qk;
    }
    for k in 0..n {
        let (kp, kq) = (v[k * n + p], v[k * n + q]);
        v[k * n + p] = c * kp - s * kq;
        v[k * n + q] = s * kp + c * kq;
    }
}

pub fn identity(n: usize) -> Vec<f64> {
    (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect()
}

pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// The symmetric square root of a positive semi-definite matrix; eigenvalues that rounding left
/// slightly negative are taken as zero.
pub fn psd_sqrt(a: &[f64], n: usize) -> Vec<f64> {
    let (values, vecs) = sym_eigen(a, n);
    let roots: Vec<f64> = values.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n).map(|k| vecs[i * n + k] * roots[k] * vecs[j * n + k]).sum();
        }
    }
    out
}

/// (M + M^T) / 2: removes the asymmetry rounding puts into products of symmetric matrices.
pub fn symmetrize(m: &[f64], n: usize) -> Vec<f64> {
    (0..n * n).map(|i| 0.5 * (m[i] + m[(i % n) * n + i / n])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn eigen_of_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3.
        let (mut values, _) = sym_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        values.sort_by(f64::total_cmp);
        assert!(max_diff(&values, &[1.0, 3.0]) < 1e-12, "{values:?}");
    }

    #[test]
    fn eigen_reconstructs_and_sqrt_squares_back() {
        let n = 40;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let x: Vec<f64> = (0..n * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        // X X^T is symmetric positive semi-definite.
        let xt: Vec<f64> = (0..n * n).map(|i| x[(i % n) * n + i / n]).collect();
        let a = matmul(&x, &xt, n);
        let (values, vecs) = sym_eigen(&a, n);
        let vt: Vec<f64> = (0..n * n).map(|i| vecs[(i % n) * n + i / n]).collect();
        let d: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { values[i / n] } else { 0.0 }).collect();
        let back = matmul(&matmul(&vecs, &d, n), &vt, n);
        assert!(max_diff(&back, &a) < 1e-9, "reconstruction error {}", max_diff(&back, &a));
        assert!(max_diff(&matmul(&vt, &vecs, n), &identity(n)) < 1e-10, "eigenvectors not orthonormal");
        let r = psd_sqrt(&a, n);
        assert!(max_diff(&matmul(&r, &r, n), &a) < 1e-8, "sqrt error {}", max_diff(&matmul(&r, &r, n), &a));
        assert_eq!(symmetrize(&[1.0, 2.0, 4.0, 3.0], 2), [1.0, 3.0, 3.0, 3.0]);
    }
}
