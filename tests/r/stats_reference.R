# Reference results from R for tests/test_stats_vs_r.py.
# Usage: Rscript stats_reference.R COHORT.csv TIES.csv OUTDIR
# Writes OUTDIR/values.csv (name,value), OUTDIR/pairs_<name>.csv (treated,control),
# OUTDIR/versions.csv. Exits with status 3 (message on stderr) when an R package is missing.
args <- commandArgs(trailingOnly = TRUE)
need <- c("survival", "MatchIt", "pROC")
missing <- need[!vapply(need, requireNamespace, logical(1), quietly = TRUE)]
if (length(missing)) {
  message("missing R packages: ", paste(missing, collapse = ", "))
  quit(status = 3)
}
suppressPackageStartupMessages({library(survival); library(MatchIt); library(pROC)})

cohort <- read.csv(args[1], stringsAsFactors = FALSE)
ties <- read.csv(args[2], stringsAsFactors = FALSE)
out <- args[3]
rownames(cohort) <- cohort$participant_id

vals <- list()
put <- function(name, x) {
  x <- unname(x)
  if (length(x) == 1) vals[[name]] <<- x
  else for (i in seq_along(x)) vals[[paste0(name, "[", i, "]")]] <<- x[i]
}

pat <- cohort[cohort$diagnosis != "HC", ]

# t-tests: second sorted level minus first (RRMS - NMOSD)
for (ve in c(TRUE, FALSE)) {
  tt <- t.test(pat$gap[pat$diagnosis == "RRMS"], pat$gap[pat$diagnosis == "NMOSD"], var.equal = ve)
  k <- if (ve) "student" else "welch"
  put(paste0(k, ".estimate"), tt$estimate[1] - tt$estimate[2])
  put(paste0(k, ".ci"), tt$conf.int)
  put(paste0(k, ".p"), tt$p.value)
  put(paste0(k, ".t"), tt$statistic)
  put(paste0(k, ".df"), tt$parameter)
}

# one-way ANOVA + Tukey HSD
fit <- aov(gap ~ diagnosis, data = cohort)
tab <- summary(fit)[[1]]
put("anova.F", tab[["F value"]][1]); put("anova.p", tab[["Pr(>F)"]][1])
tk <- TukeyHSD(fit)$diagnosis
for (r in rownames(tk)) {
  put(paste0("tukey.", r, ".diff"), tk[r, "diff"]); put(paste0("tukey.", r, ".lwr"), tk[r, "lwr"])
  put(paste0("tukey.", r, ".upr"), tk[r, "upr"]); put(paste0("tukey.", r, ".p"), tk[r, "p adj"])
}

# chi-square: 2x3 (no correction) and 2x2 (Yates)
ch <- chisq.test(table(cohort$sex, cohort$diagnosis))
put("chisq3.stat", ch$statistic); put("chisq3.p", ch$p.value)
ch <- chisq.test(table(pat$sex, pat$diagnosis))
put("chisq2.stat", ch$statistic); put("chisq2.p", ch$p.value)

# rank tests (as wilcox.test decides: normal approximation with ties, exact without)
w <- suppressWarnings(wilcox.test(edss ~ diagnosis, data = pat))
put("mw_ties.W", w$statistic); put("mw_ties.p", w$p.value)
small <- pat[pat$small == 1, ]
w <- wilcox.test(gap ~ diagnosis, data = small)
put("mw_exact.W", w$statistic); put("mw_exact.p", w$p.value)
w <- suppressWarnings(wilcox.test(pat$edss_followup, pat$edss, paired = TRUE))
put("sr_ties.V", w$statistic); put("sr_ties.p", w$p.value)
w <- wilcox.test(small$gap2, small$gap, paired = TRUE)
put("sr_exact.V", w$statistic); put("sr_exact.p", w$p.value)

# linear model
lm1 <- lm(gap ~ diagnosis + age + sex, data = cohort)
co <- summary(lm1)$coefficients
ci <- confint(lm1)
for (r in rownames(co)) {
  put(paste0("lm.", r, ".est"), co[r, 1]); put(paste0("lm.", r, ".se"), co[r, 2])
  put(paste0("lm.", r, ".t"), co[r, 3]); put(paste0("lm.", r, ".p"), co[r, 4])
  put(paste0("lm.", r, ".ci"), ci[r, ])
}

# Cox models (Efron ties, the default)
cox_put <- function(prefix, f) {
  m <- coxph(f, data = pat, ties = "efron")
  s <- summary(m)
  for (r in rownames(s$coefficients)) {
    put(paste0(prefix, ".", r, ".coef"), s$coefficients[r, "coef"])
    put(paste0(prefix, ".", r, ".se"), s$coefficients[r, "se(coef)"])
    put(paste0(prefix, ".", r, ".p"), s$coefficients[r, "Pr(>|z|)"])
    put(paste0(prefix, ".", r, ".ci"), s$conf.int[r, c("lower .95", "upper .95")])
  }
}
cox_put("coxm", Surv(time, event) ~ gap + age + sex + edss)
for (v in c("gap", "age", "sex", "edss")) cox_put(paste0("coxu_", v), as.formula(paste("Surv(time, event) ~", v)))

# log-rank (2 and 3 groups)
put("logrank2.chisq", survdiff(Surv(time, event) ~ diagnosis, data = pat)$chisq)
put("logrank3.chisq", survdiff(Surv(time, event) ~ site, data = pat)$chisq)

# Kaplan-Meier (log-log CI, as lifelines)
km <- survfit(Surv(time, event) ~ 1, data = pat, conf.type = "log-log")
ev <- km$n.event > 0
put("km.time", km$time[ev]); put("km.surv", km$surv[ev])
put("km.lower", km$lower[ev]); put("km.upper", km$upper[ev])

# ROC: marker gap, outcome event; higher gap = case
ro <- roc(pat$event, pat$gap, levels = c(0, 1), direction = "<", quiet = TRUE)
put("roc.auc", as.numeric(auc(ro)))
put("roc.ci", as.numeric(ci.auc(ro, method = "delong"))[c(1, 3)])
put("roc.var", var(ro, method = "delong"))
cc <- coords(ro, "all", ret = c("threshold", "sensitivity", "specificity"), transpose = FALSE)
ok <- cc[cc$specificity >= 0.80, ]
best <- ok[order(-ok$sensitivity, -ok$specificity), ][1, ]
put("roc.cutoff", best$threshold); put("roc.sens", best$sensitivity); put("roc.spec", best$specificity)
put("roc.wilcox.p", suppressWarnings(wilcox.test(pat$gap[pat$event == 1], pat$gap[pat$event == 0]))$p.value)

# Propensity-score matching (nearest neighbour on the glm propensity score)
write_pairs <- function(m, name) {
  mm <- m$match.matrix
  rows <- do.call(rbind, lapply(seq_len(ncol(mm)), function(j)
    data.frame(treated = rownames(mm), control = mm[, j], match = j, stringsAsFactors = FALSE)))
  rows <- rows[!is.na(rows$control), ]
  write.csv(rows, file.path(out, paste0("pairs_", name, ".csv")), row.names = FALSE)
}
bal_put <- function(m, name) {
  s <- summary(m)
  for (r in rownames(s$sum.all)) {
    put(paste0(name, ".smd_before.", r), s$sum.all[r, "Std. Mean Diff."])
    put(paste0(name, ".smd_after.", r), s$sum.matched[r, "Std. Mean Diff."])
  }
}
psm <- function(name, data, f, ...) {
  m <- matchit(f, data = data, method = "nearest", distance = "glm", ...)
  write_pairs(m, paste0(name, "_default"))
  put(paste0(name, ".ps"), m$distance)
  # Same matching on the same propensity score through MatchIt's general matcher
  # (MatchIt 4.5.1-4.5.3 truncate score differences to integers in their vectorised matcher,
  # kosukeimai/MatchIt#163; the general matcher, used when mahvars is given, computes them in
  # double precision). Matching on the Mahalanobis distance of the score alone ranks controls
  # by the absolute score difference.
  data$.ps <- m$distance
  m2 <- matchit(f, data = data, method = "nearest", distance = "glm", mahvars = ~.ps, ...)
  write_pairs(m2, paste0(name, "_general"))
  bal_put(m2, name)
}
pat$treat <- as.integer(pat$diagnosis == "NMOSD")
psm("psm1", pat, treat ~ age + sex + edss)
psm("psm_cal", pat, treat ~ age + sex + edss, caliper = 0.1)
hn <- cohort[cohort$diagnosis != "RRMS", ]
hn$treat <- as.integer(hn$diagnosis == "NMOSD")
psm("psm_r2", hn, treat ~ age + sex, ratio = 2)

# Tie rules of the vectorised matcher on integer distances (exact even where differences are
# truncated to integers)
rownames(ties) <- ties$id
tie_case <- function(name, ...) {
  m <- matchit(treat ~ x, data = ties, distance = ties$d, ...)
  write_pairs(m, name)
}
tie_case("ties_largest")
tie_case("ties_smallest", m.order = "smallest")
tie_case("ties_data", m.order = "data")
tie_case("ties_caliper", caliper = 2, std.caliper = FALSE)
tie_case("ties_ratio2", ratio = 2)

# agreement of two measurements (gap = raw, gap2 = lesion-filled): Pearson, paired t,
# SD with its chi-square CI, Bland-Altman limits with CI from SE sqrt(3 s^2 / n), proportional bias
ct <- cor.test(cohort$gap2, cohort$gap)
put("agree.r", ct$estimate); put("agree.r_ci", ct$conf.int); put("agree.r_p", ct$p.value)
pt <- t.test(cohort$gap2, cohort$gap, paired = TRUE)
put("agree.mean", pt$estimate); put("agree.mean_ci", pt$conf.int); put("agree.mean_p", pt$p.value)
d <- cohort$gap2 - cohort$gap
n <- length(d); s <- sd(d)
put("agree.sd", s)
put("agree.sd_ci", sqrt((n - 1) * s^2 / qchisq(c(0.975, 0.025), n - 1)))
se <- sqrt(3 * s^2 / n); tq <- qt(0.975, n - 1)
for (k in c("lower", "upper")) {
  lim <- mean(d) + (if (k == "lower") -1.96 else 1.96) * s
  put(paste0("agree.loa_", k), lim); put(paste0("agree.loa_", k, "_ci"), lim + c(-1, 1) * tq * se)
}
pb <- lm(d ~ I((cohort$gap2 + cohort$gap) / 2))
put("agree.slope", coef(pb)[2]); put("agree.slope_ci", confint(pb)[2, ])
put("agree.slope_p", summary(pb)$coefficients[2, 4])

res <- data.frame(name = names(vals),
                  value = vapply(vals, function(v) sprintf("%.17g", v), ""))
write.csv(res, file.path(out, "values.csv"), row.names = FALSE)
write.csv(data.frame(package = c("R", need),
                     version = c(as.character(getRversion()),
                                 vapply(need, function(p) as.character(packageVersion(p)), ""))),
          file.path(out, "versions.csv"), row.names = FALSE)
