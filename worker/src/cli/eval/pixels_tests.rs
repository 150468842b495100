//! Pixel metrics on hand-made maps and masks whose answers are worked out by hand.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn levels_are_the_score_times_65535_rounded_and_clamped() {
    assert_eq!(level(0.0), 0);
    assert_eq!(level(1.0), 65535);
    assert_eq!(level(0.5), 32768);
    assert_eq!(level(-0.2), 0);
    assert_eq!(level(1.7), 65535);
}

/// Defect pixels at 10 and 20 against normal ones at 0, 10, 10: of the six pairs the defect
/// wins four, two are ties (half each): 5/6.
#[test]
fn pixel_auroc_counts_ties_half() {
    let mut t = PixelTally::default();
    t.add(
        &[0, 10, 10, 10, 20],
        Some(&[false, false, false, true, true]),
        5,
    );
    assert!(close(t.auroc().unwrap(), 5.0 / 6.0), "{:?}", t.auroc());
    let mut none = PixelTally::default();
    none.add(&[3, 4], None, 2);
    assert!(none.auroc().is_err(), "no defect pixels");
}

/// Diagonal neighbours are one region (MVTec AD labels with a 3×3 structure).
#[test]
fn ground_truth_regions_are_8_connected() {
    #[rustfmt::skip]
    let mask = [
        true,  false, false, false,
        false, true,  false, true,
        false, false, false, true,
    ];
    let (labels, sizes) = components8(&mask, 4);
    assert_eq!(sizes, [2, 2]);
    assert_eq!(labels[0], labels[5]);
    assert_ne!(labels[0], labels[7]);
    assert_eq!(labels[7], labels[11]);
}

#[test]
fn aupro_is_1_when_every_region_is_above_every_normal_pixel_and_0_when_below() {
    let mask = [true, true, false, false, false];
    let mut perfect = PixelTally::default();
    perfect.add(&[900, 800, 10, 20, 30], Some(&mask), 5);
    assert!(close(perfect.aupro(0.3).unwrap(), 1.0));
    let mut worst = PixelTally::default();
    worst.add(&[1, 2, 10, 20, 30], Some(&mask), 5);
    assert!(close(worst.aupro(0.3).unwrap(), 0.0));
}

/// Every pixel on one level: the curve jumps from (0, 0) to (1, 1); up to 0.3 its area is
/// 0.3 × 0.15, normalised 0.15.
#[test]
fn aupro_of_a_tie_is_the_diagonal() {
    let mut t = PixelTally::default();
    t.add(&[7; 6], Some(&[true, false, true, false, false, false]), 6);
    assert!(close(t.aupro(0.3).unwrap(), 0.15), "{:?}", t.aupro(0.3));
}

/// Two regions of one image (a 1-pixel one wholly hot, a 3-pixel one two-thirds hot) over
/// normal pixels all on one middle level, and a good image (an empty mask) whose pixels sit on
/// that level too: at the hot level the PRO is (1 + 2/3) / 2 with no false positive, and it
/// stays there until every normal pixel is flagged; so up to 0.3 the curve is flat at 5/6.
#[test]
fn aupro_averages_over_regions_not_pixels_and_counts_good_images_as_normal() {
    let mut t = PixelTally::default();
    #[rustfmt::skip]
    let mask = [
        true,  false, false, false,
        false, false, true,  true,
        false, false, false, true,
    ];
    #[rustfmt::skip]
    let levels = [
        60_000, 500, 500, 500,
        500,    500, 60_000, 60_000,
        500,    500, 500,    3,
    ];
    t.add(&levels, Some(&mask), 4);
    t.add(&[500; 10], None, 5);
    assert_eq!(t.regions(), 2);
    assert!(
        close(t.aupro(0.3).unwrap(), 5.0 / 6.0),
        "{:?}",
        t.aupro(0.3)
    );
    let empty = PixelTally::default();
    assert!(empty.aupro(0.3).is_err(), "no regions");
}

/// The last piece is interpolated at the limit (MVTec AD's `trapezoid`).
#[test]
fn trapezoid_interpolates_at_the_limit() {
    let curve = [(0.0, 0.0), (0.2, 0.4), (0.4, 0.8), (1.0, 1.0)];
    // 0.2 × 0.2 / 2 + [0.2, 0.3] under a line from 0.4 to 0.6.
    assert!(close(trapezoid(&curve, 0.3), 0.04 + 0.05));
    assert!(close(trapezoid(&curve, 0.2), 0.04), "a point on the limit");
}

#[test]
fn a_box_hits_a_mask_when_it_holds_one_of_its_pixels() {
    let mut mask = vec![false; 100];
    mask[5 * 10 + 7] = true;
    let region = |x, y, width, height| DefectRegion {
        x,
        y,
        width,
        height,
        class: 0,
        score: 1.0,
    };
    assert!(box_hits(&region(6, 4, 2, 2), &mask, 10, 10));
    assert!(!box_hits(&region(0, 0, 7, 10), &mask, 10, 10));
    assert!(
        !box_hits(&region(20, 20, 5, 5), &mask, 10, 10),
        "outside the frame"
    );
}

fn dataset(root: &Path) -> Dataset {
    let profile = crate::score::ProfileConfig::builtin_default();
    Dataset::scan(root, &["good".into()], &profile).unwrap()
}

fn png(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_pixel(w, h, image::Luma([0]))
        .save(path)
        .unwrap();
}

#[test]
fn masks_are_found_mvtec_style_and_bad_ones_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let (data_dir, masks_dir) = (d.path().join("test"), d.path().join("ground_truth"));
    png(&data_dir.join("good/000.png"), 8, 6);
    png(&data_dir.join("scratch/000.png"), 8, 6);
    png(&data_dir.join("scratch/001.png"), 8, 6);
    png(&masks_dir.join("scratch/000_mask.png"), 8, 6);
    let data = dataset(&data_dir);
    let masks = Masks::scan(&masks_dir, &data).unwrap();
    assert_eq!(masks.missing, 1, "001 has no mask");
    assert!(masks.by_image[0].is_none(), "a good image needs none");
    assert!(masks.by_image[1]
        .as_ref()
        .unwrap()
        .ends_with("scratch/000_mask.png"));

    png(&masks_dir.join("scratch/001_mask.png"), 6, 5);
    let e = Masks::scan(&masks_dir, &data).err().unwrap();
    assert!(matches!(e, MaskError::Size { .. }), "{e}");
    assert!(
        e.to_string().contains("001_mask.png") && e.to_string().contains("6×5"),
        "{e}"
    );

    std::fs::write(masks_dir.join("scratch/001_mask.png"), b"not a png").unwrap();
    let e = Masks::scan(&masks_dir, &data).err().unwrap();
    assert!(matches!(e, MaskError::Unreadable { .. }), "{e}");
    assert!(e.to_string().contains("001_mask.png"), "{e}");

    let e = Masks::scan(&d.path().join("nope"), &data).err().unwrap();
    assert!(matches!(e, MaskError::NotAFolder(_)), "{e}");
}
